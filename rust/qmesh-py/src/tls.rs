//! `qmesh._core.TlsClient`: a TLS client connection (rustls) that Python
//! drives through its handshake and login, then hands to a native relay
//! (`TunnelEngine.attach_native(..., tls=...)`), which carries on with the
//! same connection without Python.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use qmesh_relay::tls::{self, Verify};
use qmesh_relay::TlsHandover;

use crate::Result;

/// A TLS client connection, sans-IO (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "TlsClient")]
pub struct TlsClient {
    inner: Option<tls::TlsClient>,
}

impl TlsClient {
    fn live(&mut self) -> PyResult<&mut tls::TlsClient> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("the TLS connection was handed to a relay"))
    }

    fn live_ref(&self) -> PyResult<&tls::TlsClient> {
        self.inner
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("the TLS connection was handed to a relay"))
    }

    /// The connection, for a native relay; the object is spent afterwards.
    pub fn hand_over(&mut self) -> PyResult<TlsHandover> {
        let client = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err("the TLS connection was handed to a relay"))?;
        Ok(TlsHandover(client.into_connection()))
    }
}

#[pymethods]
impl TlsClient {
    #[new]
    #[pyo3(signature = (server_name, *, verify, root_certificates = None, alpn = None))]
    fn new(
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
        Ok(TlsClient {
            inner: Some(tls::TlsClient::new(conn)),
        })
    }

    fn receive<'py>(&mut self, py: Python<'py>, data: &[u8]) -> Result<Bound<'py, PyBytes>> {
        let plain = self.live()?.receive(data)?;
        Ok(PyBytes::new(py, &plain))
    }

    fn receive_eof(&mut self) -> PyResult<bool> {
        Ok(self.live()?.receive_eof())
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
    fn handed_over(&self) -> bool {
        self.inner.is_none()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TlsClient>()?;
    Ok(())
}
