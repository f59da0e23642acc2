//! `qmesh._core.TlsSession`: a TLS connection (rustls), client or server,
//! that Python drives through its handshake and what precedes the relay (a
//! login, a startup packet), then hands to a native relay
//! (`TunnelEngine.attach_native(..., tls=...)`), which carries on with the
//! same connection without Python. `TlsServerConfig`: a server's
//! certificate and key, loaded once.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use qmesh_relay::tls::{self, Verify};
use qmesh_relay::TlsHandover;

use crate::Result;

const HANDED_OVER: &str = "the TLS connection was handed to a relay";

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
    #[pyo3(signature = (root_certificates, *, alpn = None))]
    fn new(root_certificates: &[u8], alpn: Option<Vec<Vec<u8>>>) -> Result<Self> {
        let inner = tls::client_config(Verify::Full, root_certificates, alpn.unwrap_or_default())?;
        Ok(TlsClientConfig { inner })
    }
}

/// A TLS connection, sans-IO (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "TlsSession")]
pub struct TlsSession {
    inner: Option<tls::TlsSession>,
}

impl TlsSession {
    fn live(&mut self) -> PyResult<&mut tls::TlsSession> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err(HANDED_OVER))
    }

    fn live_ref(&self) -> PyResult<&tls::TlsSession> {
        self.inner
            .as_ref()
            .ok_or_else(|| PyValueError::new_err(HANDED_OVER))
    }

    /// The connection, for a native relay; the object is spent afterwards.
    pub fn hand_over(&mut self) -> PyResult<TlsHandover> {
        let session = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err(HANDED_OVER))?;
        Ok(TlsHandover(session.into_connection()))
    }
}

#[pymethods]
impl TlsSession {
    #[staticmethod]
    #[pyo3(signature = (server_name, *, verify, root_certificates = None, alpn = None))]
    fn client(
        server_name: &str,
        verify: &str,
        root_certificates: Option<&[u8]>,
        alpn: Option<Vec<Vec<u8>>>,
    ) -> Result<Self> {
        let verify = match verify {
            "none" => Verify::None,
            "ca" => Verify::Chain,
            "full" => Verify::Full,
            other => {
                let why = format!("verify must be 'none', 'ca' or 'full', not {other:?}");
                return Err(PyValueError::new_err(why).into());
            }
        };
        let config = tls::client_config(
            verify,
            root_certificates.unwrap_or_default(),
            alpn.unwrap_or_default(),
        )?;
        let conn = tls::connect(config, server_name)?;
        Ok(TlsSession {
            inner: Some(tls::TlsSession::new(conn)),
        })
    }

    #[staticmethod]
    fn server(config: &TlsServerConfig) -> Result<Self> {
        let conn = tls::accept(config.inner.clone())?;
        Ok(TlsSession {
            inner: Some(tls::TlsSession::new(conn)),
        })
    }

    fn receive<'py>(&mut self, py: Python<'py>, data: &[u8]) -> Result<Bound<'py, PyBytes>> {
        let plain = self.live()?.receive(data)?;
        Ok(PyBytes::new(py, &plain))
    }

    fn send(&mut self, data: &[u8]) -> Result<()> {
        Ok(self.live()?.send(data)?)
    }

    fn outgoing<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.live()?.outgoing();
        Ok(PyBytes::new(py, &out))
    }

    fn close(&mut self) -> PyResult<()> {
        self.live()?.close();
        Ok(())
    }

    #[getter]
    fn handshaking(&self) -> PyResult<bool> {
        Ok(self.live_ref()?.handshaking())
    }

    #[getter]
    fn peer_certificate<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let cert = self.live_ref()?.peer_certificate();
        Ok(cert.map(|c| PyBytes::new(py, &c)))
    }

    #[getter]
    fn protocol_version(&self) -> PyResult<Option<&'static str>> {
        Ok(self.live_ref()?.protocol_version())
    }

    #[getter]
    fn alpn_protocol<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let alpn = self.live_ref()?.alpn_protocol();
        Ok(alpn.map(|a| PyBytes::new(py, &a)))
    }

    #[getter]
    fn handed_over(&self) -> bool {
        self.inner.is_none()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TlsServerConfig>()?;
    m.add_class::<TlsClientConfig>()?;
    m.add_class::<TlsSession>()?;
    Ok(())
}
