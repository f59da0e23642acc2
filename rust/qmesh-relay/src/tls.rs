//! TLS on a native stream's socket, with rustls: as a client (the Gate's
//! connection to a PostgreSQL that asks for TLS) and as a server (the
//! MiniGate's Postgres listener for applications that speak TLS).
//!
//! One connection lives two lives: Python drives its handshake and the
//! startup or login through [`TlsSession`] (sans-IO: ciphertext in,
//! plaintext out and back), then a native relay takes the same connection
//! over ([`TlsLink`]) and reads and writes records on the socket itself, so
//! a TLS session costs no Python per message either.
//!
//! A client's verification follows libpq's `sslmode`: [`Verify::Full`] checks the chain
//! and the host name, [`Verify::Chain`] the chain only, [`Verify::None`]
//! neither (`require` without a root certificate). Even then the handshake's
//! signatures are checked, so the server proves it holds the key of the
//! certificate it sent (what channel binding relies on).

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, DigitallySignedStruct,
    RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};

use crate::sys;

/// What the client checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Nothing but the handshake's signatures (libpq's `require`).
    None,
    /// The chain up to a trusted root, whatever name it is for (`verify-ca`).
    Chain,
    /// The chain and the server's name (`verify-full`).
    Full,
}

/// Why TLS failed: the text of rustls' error or of the configuration's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

impl From<rustls::Error> for TlsError {
    fn from(err: rustls::Error) -> Self {
        TlsError(err.to_string())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A client configuration: `roots_pem` holds the trusted certificates (PEM;
/// ignored for [`Verify::None`]), `alpn` the protocols offered.
pub fn client_config(
    verify: Verify,
    roots_pem: &[u8],
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::None => Arc::new(Lenient {
            chain: None,
            provider,
        }),
        Verify::Chain | Verify::Full => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(roots_pem) {
                let cert = cert.map_err(|e| TlsError(format!("root certificates: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError(format!("root certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(TlsError("no root certificate to verify against".into()));
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError(e.to_string()))?;
            if verify == Verify::Full {
                webpki
            } else {
                Arc::new(Lenient {
                    chain: Some(webpki),
                    provider,
                })
            }
        }
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// A new client connection to `server_name` (a DNS name or an IP address).
pub fn connect(config: Arc<ClientConfig>, server_name: &str) -> Result<Connection, TlsError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| TlsError(format!("{server_name:?} is not a valid server name")))?;
    Ok(Connection::Client(ClientConnection::new(config, name)?))
}

/// A server configuration: the certificate chain and its private key (PEM),
/// the protocols `alpn` offers (the client must pick one of them if it
/// offers any).
pub fn server_config(
    chain_pem: &[u8],
    key_pem: &[u8],
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError("no certificate in the certificate file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError(format!("private key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// A new server connection.
pub fn accept(config: Arc<ServerConfig>) -> Result<Connection, TlsError> {
    Ok(Connection::Server(ServerConnection::new(config)?))
}

/// `require` (no `chain`: any certificate) and `verify-ca` (the chain is
/// checked, the name it is for is not). Either way the handshake must be
/// signed by the certificate's key.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A connection driven from outside (sans-IO): the caller moves the
/// ciphertext between it and the socket. For the handshake and what comes
/// before the relay (a login, a startup packet).
pub struct TlsSession {
    conn: Connection,
}

impl TlsSession {
    pub fn new(conn: Connection) -> Self {
        TlsSession { conn }
    }

    /// Take ciphertext from the peer; returns the plaintext it completed,
    /// after any a relay left inside (records a [`TlsLink`] decrypted and
    /// did not hand out before the connection came back).
    pub fn receive(&mut self, mut ciphertext: &[u8]) -> Result<Vec<u8>, TlsError> {
        let mut plain = Vec::new();
        self.drain_plaintext(&mut plain)?;
        while !ciphertext.is_empty() {
            self.conn
                .read_tls(&mut ciphertext)
                .map_err(|e| TlsError(e.to_string()))?;
            self.conn.process_new_packets()?;
            self.drain_plaintext(&mut plain)?;
        }
        Ok(plain)
    }

    fn drain_plaintext(&mut self, plain: &mut Vec<u8>) -> Result<(), TlsError> {
        match self.conn.reader().read_to_end(plain) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(TlsError(e.to_string())),
        }
    }

    /// Queue plaintext for the peer.
    pub fn send(&mut self, plaintext: &[u8]) -> Result<(), TlsError> {
        self.conn
            .writer()
            .write_all(plaintext)
            .map_err(|e| TlsError(e.to_string()))
    }

    /// The ciphertext to write to the socket now.
    pub fn outgoing(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut out).is_err() {
                break;
            }
        }
        out
    }

    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The peer's certificate (DER), once the handshake has it.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        self.conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|cert| cert.as_ref().to_vec())
    }

    /// `"TLSv1.3"` or `"TLSv1.2"`, once negotiated.
    pub fn protocol_version(&self) -> Option<&'static str> {
        self.conn.protocol_version().and_then(|v| v.as_str())
    }

    /// The application protocol agreed by ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<Vec<u8>> {
        self.conn.alpn_protocol().map(<[u8]>::to_vec)
    }

    /// Say close_notify (sent with the next [`TlsSession::outgoing`]).
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }

    pub fn into_connection(self) -> Connection {
        self.conn
    }
}

/// A TLS connection shared by whoever holds its socket: Python (its
/// handshake, a login, a pool's checks and resets, a session relayed in
/// Python) or an engine that borrowed a pooled server connection, which
/// takes the connection out for the loan ([`TlsSlot::take`]) and puts it
/// back at the end ([`TlsSlot::put`]). One holder at a time, by the pool's
/// rules, so the lock is never contended for long.
pub struct TlsSlot {
    session: Mutex<Option<TlsSession>>,
}

impl TlsSlot {
    pub fn new(session: TlsSession) -> Self {
        TlsSlot {
            session: Mutex::new(Some(session)),
        }
    }

    /// The session, None while it is out (lent to an engine, or handed
    /// over for good).
    pub fn lock(&self) -> MutexGuard<'_, Option<TlsSession>> {
        // A session is whole after any panic: keep using it.
        self.session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection, taken out; None if it is out already.
    pub fn take(&self) -> Option<Connection> {
        self.lock().take().map(TlsSession::into_connection)
    }

    /// Put back a connection [`TlsSlot::take`] took.
    pub fn put(&self, conn: Connection) {
        *self.lock() = Some(TlsSession::new(conn));
    }
}

/// A slot is itself (as a pooled connection's [`crate::pool::Prepared`]).
impl PartialEq for TlsSlot {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for TlsSlot {}

impl fmt::Debug for TlsSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsSlot")
    }
}

/// A socket's TLS layer inside a native relay.
pub struct TlsLink {
    conn: Box<Connection>,
    /// Plaintext decrypted and not yet taken.
    pending: usize,
    /// The last read from the socket got less than it asked for: the
    /// socket held nothing more then.
    socket_drained: bool,
    close_sent: bool,
    /// The socket's stream ended...
    ended: bool,
    /// ...and the peer's close_notify had come (else anyone could have cut it).
    peer_closed: bool,
    /// Ciphertext read from the socket that rustls did not take (it held
    /// as much plaintext as it takes): given to it before the socket is
    /// read again.
    staged: Vec<u8>,
}

struct Fd(RawFd);

/// Ciphertext read from a socket per system call, at most. rustls alone
/// reads 4 KiB a call: a large result cost a call per 4 KiB, four per
/// full record. Not more than rustls' limit on plaintext waiting to be read
/// (16 KiB): the socket is read only when none waits, so rustls takes all
/// of a read but where it completes a record begun by an earlier one.
const SOCKET_READ: usize = 16 * 1024;

thread_local! {
    /// Where a thread's reads land before rustls takes them.
    static CIPHERTEXT: RefCell<Box<[u8]>> = RefCell::new(vec![0; SOCKET_READ].into_boxed_slice());
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.0, buf)
    }

    /// rustls hands every record waiting at once: one system call for all
    /// (the default would send only the first, a call per record).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        sys::send_vectored(self.0, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsLink {
    pub fn new(conn: Connection) -> Self {
        TlsLink {
            conn: Box::new(conn),
            pending: 0,
            socket_drained: false,
            ended: false,
            peer_closed: false,
            close_sent: false,
            staged: Vec::new(),
        }
    }

    /// Data is waiting inside the TLS layer, plaintext or ciphertext read
    /// from the socket (no socket event will say so).
    pub fn has_pending(&self) -> bool {
        self.pending > 0 || !self.staged.is_empty()
    }

    /// The stream ended without the peer's close_notify: what it carried
    /// may have been cut short by anyone on the path (a body delimited by
    /// the connection's end cannot be taken as whole).
    pub fn cut_short(&self) -> bool {
        self.ended && !self.peer_closed
    }

    /// Ciphertext is waiting to be written.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Whether everything the socket had was read and taken: no plaintext
    /// is left inside, and the last read from the socket came back short.
    /// Then another read would only find the socket empty (the engine
    /// watches it level-triggered, so what arrives later is announced).
    pub fn drained(&self) -> bool {
        !self.has_pending() && self.socket_drained
    }

    /// Up to `buf.len()` bytes of plaintext, reading records from `fd` as
    /// needed: `Ok(0)` at the end of the stream, `WouldBlock` when the
    /// socket has nothing more for now. Records that need an answer (a key
    /// update) queue it; [`TlsLink::flush`] writes it.
    pub fn read(&mut self, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        let mut read_socket = false;
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => {
                    self.pending = self.pending.saturating_sub(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The TCP stream ended without close_notify. A Postgres
                // server's messages delimit themselves, so a cut is seen by
                // the client as a cut message, as libpq treats it.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if !self.staged.is_empty() {
                // No plaintext waits: rustls takes some of it now.
                let mut staged = std::mem::take(&mut self.staged);
                let mut rest = staged.as_slice();
                self.give(&mut rest)?;
                let taken = staged.len() - rest.len();
                staged.drain(..taken); // the rest stays, in its buffer
                self.staged = staged;
                continue;
            }
            if read_socket && self.socket_drained {
                // A short read emptied the socket and left no plaintext (a
                // record cut short, or one that carries none): reading
                // again would only find it empty.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let got = self.read_socket(fd);
            read_socket = true;
            if got? == 0 && self.pending == 0 {
                return Ok(0);
            }
        }
    }

    /// One read of the socket, given to rustls and processed (what it does
    /// not take is staged): how many bytes (0: the stream ended).
    fn read_socket(&mut self, fd: RawFd) -> io::Result<usize> {
        CIPHERTEXT.with_borrow_mut(|ciphertext| {
            let got = sys::read(fd, ciphertext);
            self.socket_drained = match &got {
                Ok(n) => *n < ciphertext.len(),
                Err(e) => sys::would_block(e),
            };
            let n = got?;
            if n == 0 {
                self.ended = true;
                self.conn.read_tls(&mut &b""[..])?; // tells rustls the stream ended
                self.process()?;
                return Ok(0);
            }
            let mut rest = &ciphertext[..n];
            self.give(&mut rest)?;
            self.staged.extend_from_slice(rest);
            Ok(n)
        })
    }

    /// Give rustls ciphertext, processing as it goes, until all is taken
    /// or it holds as much plaintext as it takes; `rest` is left with what
    /// it did not take.
    fn give(&mut self, rest: &mut &[u8]) -> io::Result<()> {
        while !rest.is_empty() {
            match self.conn.read_tls(rest) {
                // A close_notify came: what follows is not the peer's data.
                Ok(0) => *rest = &[],
                Ok(_) => {
                    self.process()?;
                }
                // Its plaintext is full: the rest waits until it is read.
                Err(_) if self.pending > 0 => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn process(&mut self) -> io::Result<usize> {
        let state = self
            .conn
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.pending = state.plaintext_bytes_to_read();
        self.peer_closed = state.peer_has_closed();
        Ok(self.pending)
    }

    /// Take as much of `plaintext` as the TLS layer's buffer allows (sealed
    /// into records, not yet written); how much.
    pub fn write(&mut self, plaintext: &[u8]) -> io::Result<usize> {
        self.conn.writer().write(plaintext)
    }

    /// Write sealed records to `fd` until it would block or none are left.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Fd(fd)) {
                Ok(_) => {}
                Err(e) if sys::would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The connection, for its next holder.
    pub fn into_connection(self) -> Connection {
        *self.conn
    }

    /// Queue close_notify, once.
    pub fn close(&mut self) {
        if !self.close_sent {
            self.close_sent = true;
            self.conn.send_close_notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// A client and a server session, handshaken in memory.
    fn pair() -> (TlsSession, TlsSession) {
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let server_config = server_config(
            cert.pem().as_bytes(),
            key_pair.serialize_pem().as_bytes(),
            vec![],
        )
        .unwrap();
        let client_config = client_config(Verify::None, b"", vec![]).unwrap();
        let mut client = TlsSession::new(connect(client_config, "localhost").unwrap());
        let mut server = TlsSession::new(accept(server_config).unwrap());
        while client.handshaking() || server.handshaking() {
            server.receive(&client.outgoing()).unwrap();
            client.receive(&server.outgoing()).unwrap();
        }
        (client, server)
    }

    /// The client's side as an engine's link, reading a socket that holds
    /// what the server sent so far: (link, the server's end, the link's).
    fn linked(client: TlsSession, server: &mut TlsSession) -> (TlsLink, UnixStream, UnixStream) {
        let (mut socket, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        socket.write_all(&server.outgoing()).unwrap();
        (TlsLink::new(client.into_connection()), socket, theirs)
    }

    #[test]
    fn plaintext_a_link_left_inside_comes_out_of_the_session_it_goes_back_to() {
        let (client, mut server) = pair();
        let sent: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        for piece in sent.chunks(1000) {
            server.send(piece).unwrap(); // a record each
        }
        // The engine's read takes less than the records hold...
        let (mut link, _socket, theirs) = linked(client, &mut server);
        let mut buf = [0u8; 100];
        let n = link.read(theirs.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], &sent[..100]);
        assert!(link.has_pending() && !link.drained());

        // ...and the rest is Python's once the connection is back.
        let mut session = TlsSession::new(link.into_connection());
        let rest = session.receive(b"").unwrap();
        assert_eq!(rest, &sent[100..]);
        assert!(session.receive(b"").unwrap().is_empty());
    }

    /// Everything the link reads until the socket has no more, `size`
    /// bytes a read at most.
    fn read_all(link: &mut TlsLink, fd: RawFd, size: usize, into: &mut Vec<u8>) {
        let mut buf = vec![0u8; size];
        loop {
            match link.read(fd, &mut buf) {
                Ok(0) => panic!("the stream ended"),
                Ok(n) => into.extend_from_slice(&buf[..n]),
                Err(e) if sys::would_block(&e) => return,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    #[test]
    fn ciphertext_rustls_cannot_take_yet_waits_in_the_link_and_none_is_lost() {
        let (client, mut server) = pair();
        let (mut link, _socket, theirs) = linked(client, &mut server);
        let sent: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        let mut ciphertext = Vec::new();
        for piece in sent.chunks(4_000) {
            server.send(piece).unwrap(); // a record each
            ciphertext.extend(server.outgoing());
        }
        // More than rustls takes before its plaintext is full (16 KiB)...
        let mut rest = ciphertext.as_slice();
        link.give(&mut rest).unwrap();
        assert!(!rest.is_empty() && rest.len() < ciphertext.len());
        link.staged = rest.to_vec();
        assert!(link.has_pending() && !link.drained());
        // ...the rest waits in the link, and reads take it all, in order,
        // with nothing more on the socket.
        let mut got = Vec::new();
        read_all(&mut link, theirs.as_raw_fd(), 5_000, &mut got);
        assert!(
            got == sent,
            "the plaintext came out changed or out of order"
        );
        assert!(link.staged.is_empty() && link.drained());
    }

    #[test]
    fn records_cut_anywhere_come_out_whole_and_in_order() {
        let (client, mut server) = pair();
        let (mut link, mut socket, theirs) = linked(client, &mut server);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut ciphertext = Vec::new();
        let mut at = 0;
        for size in [16_384, 5, 16_384, 4_000, 900, 16_384, 16_384, 1]
            .iter()
            .cycle()
        {
            let end = (at + size).min(sent.len());
            server.send(&sent[at..end]).unwrap();
            ciphertext.extend(server.outgoing());
            at = end;
            if at == sent.len() {
                break;
            }
        }
        let mut got = Vec::new();
        // Cuts that fall anywhere in records, reads of several sizes.
        let mut cut = 0;
        for (i, step) in [16_000, 700, 33_000, 3, 20_000, 16_406]
            .iter()
            .cycle()
            .enumerate()
        {
            let end = (cut + step).min(ciphertext.len());
            socket.write_all(&ciphertext[cut..end]).unwrap();
            cut = end;
            read_all(
                &mut link,
                theirs.as_raw_fd(),
                [65_536, 100, 16_384][i % 3],
                &mut got,
            );
            if cut == ciphertext.len() {
                break;
            }
        }
        assert_eq!(got.len(), sent.len());
        assert!(
            got == sent,
            "the plaintext came out changed or out of order"
        );
    }

    #[test]
    fn records_waiting_together_leave_in_one_write() {
        let (client, mut server) = pair();
        let (mut link, mut socket, theirs) = linked(client, &mut server);
        for piece in [b"one".as_slice(), b"two", b"three"] {
            assert_eq!(link.write(piece).unwrap(), piece.len()); // a record each
        }
        // One write hands the socket all three, not the first alone.
        link.conn.write_tls(&mut Fd(theirs.as_raw_fd())).unwrap();
        assert!(!link.wants_write());
        let mut got = vec![0u8; 4096];
        let n = socket.read(&mut got).unwrap();
        assert_eq!(server.receive(&got[..n]).unwrap(), b"onetwothree");
    }

    #[test]
    fn a_short_read_of_the_socket_leaves_it_drained() {
        let (client, mut server) = pair();
        server.send(b"one record").unwrap();
        let (mut link, mut socket, theirs) = linked(client, &mut server);
        let mut buf = [0u8; 4096];
        let n = link.read(theirs.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"one record");
        assert!(link.drained(), "nothing more: no read should follow");
        // Half a record: the read that finds it gives no plaintext and does
        // not read again.
        server.send(b"two").unwrap();
        let record = server.outgoing();
        socket.write_all(&record[..record.len() / 2]).unwrap();
        let err = link.read(theirs.as_raw_fd(), &mut buf).unwrap_err();
        assert!(sys::would_block(&err));
        socket.write_all(&record[record.len() / 2..]).unwrap();
        let n = link.read(theirs.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"two");
    }
}
