//! `qmesh._core.TlsSession`: a TLS connection (rustls), client or server,
//! that Python drives through its handshake and what precedes the relay (a
//! login, a startup packet), then hands to a native relay
//! (`TunnelEngine.attach_native(..., tls=...)`), which carries on with the
//! same connection without Python, or lends it to the engines a pooled
//! server connection goes to (`PoolShelf.give(..., tls=...)`).
//! `TlsServerConfig`: a server's certificate and key, loaded once.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use qmesh_relay::tls::{self, TlsSlot, Verify};
use qmesh_relay::TlsHandover;

use crate::Result;

const HANDED_OVER: &str = "the TLS connection was handed to a relay, or is lent to one";

/// A server's certificate chain and key (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "TlsServerConfig", frozen)]
pub struct TlsServerConfig {
    pub(crate) inner: Arc<rustls::ServerConfig>,
}

#[pymethods]
impl TlsServerConfig {
    #[new]
    #[pyo3(signature = (certificate_chain, private_key, *, alpn = None))]
    fn new(
        certificate_chain: &[u8],
        private_key: &[u8],
        alpn: Option<Vec<Vec<u8>>>,
    ) -> Result<Self> {
        let inner = tls::server_config(certificate_chain, private_key, alpn.unwrap_or_default())?;
        Ok(TlsServerConfig { inner })
    }
}

/// A client's trust: roots and verification, loaded once (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "TlsClientConfig", frozen)]
pub struct TlsClientConfig {
    pub(crate) inner: Arc<rustls::ClientConfig>,
}

#[pymethods]
impl TlsClientConfig {
    #[new]
    #[pyo3(signature = (root_certificates, *, verify = "full", alpn = None))]
    fn new(root_certificates: &[u8], verify: &str, alpn: Option<Vec<Vec<u8>>>) -> Result<Self> {
        let verify = match verify {
            "none" => Verify::None,
            "ca" => Verify::Chain,
            "full" => Verify::Full,
            other => {
                let why = format!("verify must be 'none', 'ca' or 'full', not {other:?}");
                return Err(PyValueError::new_err(why).into());
            }
        };
        let inner = tls::client_config(verify, root_certificates, alpn.unwrap_or_default())?;
        Ok(TlsClientConfig { inner })
    }
}

/// A TLS connection, sans-IO (see ``qmesh/_core.pyi``). Its connection
/// sits in a slot shared with a pool's engine loans (``PoolShelf.give``).
#[pyclass(module = "qmesh._core", name = "TlsSession", frozen)]
pub struct TlsSession {
    slot: Arc<TlsSlot>,
}

impl TlsSession {
    fn new(conn: rustls::Connection) -> Self {
        TlsSession {
            slot: Arc::new(TlsSlot::new(tls::TlsSession::new(conn))),
        }
    }

    /// Run `f` on the connection; an error while it is out of its slot.
    fn with<R>(&self, f: impl FnOnce(&mut tls::TlsSession) -> R) -> PyResult<R> {
        let mut session = self.slot.lock();
        let live = session
            .as_mut()
            .ok_or_else(|| PyValueError::new_err(HANDED_OVER))?;
        Ok(f(live))
    }

    /// The connection, for a native relay; the object is spent afterwards.
    pub fn hand_over(&self) -> PyResult<TlsHandover> {
        let conn = self
            .slot
            .take()
            .ok_or_else(|| PyValueError::new_err(HANDED_OVER))?;
        Ok(TlsHandover(conn))
    }

    /// The slot a pooled connection's loans take the connection out of.
    pub fn slot(&self) -> Arc<TlsSlot> {
        Arc::clone(&self.slot)
    }
}

#[pymethods]
impl TlsSession {
    #[staticmethod]
    #[pyo3(signature = (server_name, *, config))]
    fn client(server_name: &str, config: &TlsClientConfig) -> Result<Self> {
        Ok(TlsSession::new(tls::connect(
            Arc::clone(&config.inner),
            server_name,
        )?))
    }

    #[staticmethod]
    fn server(config: &TlsServerConfig) -> Result<Self> {
        Ok(TlsSession::new(tls::accept(config.inner.clone())?))
    }

    fn receive<'py>(&self, py: Python<'py>, data: &[u8]) -> Result<Bound<'py, PyBytes>> {
        let plain = self.with(|s| s.receive(data))??;
        Ok(PyBytes::new(py, &plain))
    }

    fn send(&self, data: &[u8]) -> Result<()> {
        Ok(self.with(|s| s.send(data))??)
    }

    fn outgoing<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.with(tls::TlsSession::outgoing)?;
        Ok(PyBytes::new(py, &out))
    }

    fn close(&self) -> PyResult<()> {
        self.with(tls::TlsSession::close)
    }

    #[getter]
    fn handshaking(&self) -> PyResult<bool> {
        self.with(|s| s.handshaking())
    }

    #[getter]
    fn peer_certificate<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let cert = self.with(|s| s.peer_certificate())?;
        Ok(cert.map(|c| PyBytes::new(py, &c)))
    }

    #[getter]
    fn protocol_version(&self) -> PyResult<Option<&'static str>> {
        self.with(|s| s.protocol_version())
    }

    #[getter]
    fn alpn_protocol<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let alpn = self.with(|s| s.alpn_protocol())?;
        Ok(alpn.map(|a| PyBytes::new(py, &a)))
    }

    /// Out of this object: handed over to a native relay, or lent with a
    /// pooled connection to an engine.
    #[getter]
    fn handed_over(&self) -> bool {
        self.slot.lock().is_none()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TlsServerConfig>()?;
    m.add_class::<TlsClientConfig>()?;
    m.add_class::<TlsSession>()?;
    Ok(())
}
