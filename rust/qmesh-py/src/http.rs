//! `qmesh._core.HttpEngine`: the Gate's HTTP engine (`qmesh_relay::http`),
//! and what it reports: `HttpRequest`, `HttpProxied`, `HttpFastBatch`,
//! `HttpFastDone`, `HttpRouteReleased`, `HttpNotice`.

use crate::seconds;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use qmesh_relay::http::{self as relay, HttpEvent, ProxyOutcome};
use qmesh_relay::{FastRoute, RouteKey};
use std::time::Instant;

use crate::tls::{TlsClientConfig, TlsServerConfig};
use crate::Result;

/// A route is renewed (one request decided afresh by Python) from this
/// fraction of its time to live on: before the others would have to be.
const RENEW_AT: f64 = 0.75;

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// TLS towards an upstream, from Python's config and the name to verify.
fn upstream_tls(
    tls: Option<PyRef<'_, TlsClientConfig>>,
    server_name: Option<&str>,
) -> PyResult<Option<relay::UpstreamTls>> {
    match (tls, server_name) {
        (None, _) => Ok(None),
        (Some(config), Some(name)) => Ok(Some(relay::UpstreamTls {
            config: Arc::clone(&config.inner),
            server_name: Arc::from(name),
        })),
        (Some(_), None) => Err(PyValueError::new_err("tls needs a server_name")),
    }
}

/// A whole request for Python to answer (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "HttpRequest", frozen, get_all)]
pub struct HttpRequest {
    exchange: u64,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Py<PyBytes>,
    peer: String,
    /// The fast path's route that failed for this request, and how.
    failed_route: Option<u64>,
    failed: Option<Py<HttpProxied>>,
}

/// A request the fast path relayed, for booking (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "HttpFastDone", frozen, get_all)]
pub struct HttpFastDone {
    exchange: u64,
    route: u64,
    outcome: Py<HttpProxied>,
    body_len: usize,
    started_at: f64,
}

/// The requests one fast-path route relayed whole since the last poll, for
/// booking together (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "HttpFastBatch", frozen, get_all)]
pub struct HttpFastBatch {
    route: u64,
    /// `(started_at, body_len, tokens_in, tokens_out, bytes_out)` each.
    requests: Py<PyList>,
}

/// What Python books of a request relayed whole: see [`HttpFastBatch`].
type Relayed = (f64, usize, u64, u64, u64);

/// A fast-path route no request will name any more (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "HttpRouteReleased", frozen, get_all)]
pub struct HttpRouteReleased {
    route: u64,
}

/// What came of a proxied request (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "HttpProxied", frozen, get_all)]
pub struct HttpProxied {
    exchange: u64,
    kind: &'static str,
    reason: Option<String>,
    timeout: bool,
    status: u16,
    body: Py<PyBytes>,
    content_type: Option<String>,
    client_gone: bool,
    open: bool,
    tokens_in: u64,
    tokens_out: u64,
    bytes_out: u64,
    first_byte_at: f64,
}

/// ``drained`` or ``gone`` (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "HttpNotice", frozen, get_all)]
pub struct HttpNotice {
    exchange: u64,
    kind: &'static str,
}

/// The HTTP engine (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "HttpEngine", frozen)]
pub struct HttpEngine {
    inner: relay::HttpEngine,
}

fn proxied(py: Python<'_>, exchange: u64, outcome: ProxyOutcome) -> HttpProxied {
    let mut out = HttpProxied {
        exchange,
        kind: "failed",
        reason: None,
        timeout: false,
        status: 0,
        body: PyBytes::new(py, b"").unbind(),
        content_type: None,
        client_gone: false,
        open: false,
        tokens_in: 0,
        tokens_out: 0,
        bytes_out: 0,
        first_byte_at: 0.0,
    };
    match outcome {
        ProxyOutcome::Failed { reason, timeout } => {
            out.reason = Some(reason);
            out.timeout = timeout;
        }
        ProxyOutcome::Refused {
            status,
            body,
            content_type,
        } => {
            out.kind = "refused";
            out.status = status;
            out.body = PyBytes::new(py, &body).unbind();
            out.content_type = content_type.as_deref().map(latin1);
        }
        ProxyOutcome::Relayed {
            broken,
            client_gone,
            open,
            usage,
        } => {
            out.kind = "relayed";
            out.status = 200;
            out.reason = broken;
            out.client_gone = client_gone;
            out.open = open;
            out.tokens_in = usage.tokens_in;
            out.tokens_out = usage.tokens_out;
            out.bytes_out = usage.bytes_out;
            out.first_byte_at = usage.first_byte_at;
        }
    }
    out
}

fn request(
    py: Python<'_>,
    exchange: u64,
    head: qmesh_http::RequestHead,
    body: &[u8],
    peer: &str,
) -> HttpRequest {
    HttpRequest {
        exchange,
        method: head.method,
        target: head.target,
        headers: head
            .headers
            .into_iter()
            .map(|(name, value)| (name, latin1(&value)))
            .collect(),
        body: PyBytes::new(py, body).unbind(),
        peer: peer.to_string(),
        failed_route: None,
        failed: None,
    }
}

/// The engine's events as Python sees them. The requests a route relayed
/// whole are reported as one `HttpFastBatch` per route, where the first of
/// them was: Python books them in one go, which costs a fraction of a
/// report each (the route's own release comes after its last request, so
/// after the batch too).
fn to_python(py: Python<'_>, events: Vec<HttpEvent>) -> PyResult<Vec<Py<PyAny>>> {
    enum Slot {
        Ready(Py<PyAny>),
        Batch(usize),
    }
    let mut slots = Vec::with_capacity(events.len());
    let mut batches: Vec<(u64, Vec<Relayed>)> = Vec::new();
    let mut batch_of_route: HashMap<u64, usize> = HashMap::new();
    for event in events {
        let object: Py<PyAny> = match event {
            HttpEvent::FastDone {
                route,
                outcome:
                    ProxyOutcome::Relayed {
                        broken: None,
                        open: false,
                        usage,
                        ..
                    },
                body_len,
                started_at,
                ..
            } => {
                let relayed = (
                    started_at,
                    body_len,
                    usage.tokens_in,
                    usage.tokens_out,
                    usage.bytes_out,
                );
                let batch = *batch_of_route.entry(route).or_insert_with(|| {
                    batches.push((route, Vec::new()));
                    slots.push(Slot::Batch(batches.len() - 1));
                    batches.len() - 1
                });
                batches[batch].1.push(relayed);
                continue;
            }
            HttpEvent::Request {
                exchange,
                head,
                body,
                peer,
            } => Py::new(py, request(py, exchange, head, &body, &peer))?.into_any(),
            HttpEvent::FastFailed {
                exchange,
                route,
                outcome,
                head,
                body,
                peer,
            } => {
                let mut event = request(py, exchange, head, &body, &peer);
                event.failed_route = Some(route);
                event.failed = Some(Py::new(py, proxied(py, exchange, outcome))?);
                Py::new(py, event)?.into_any()
            }
            HttpEvent::FastDone {
                exchange,
                route,
                outcome,
                body_len,
                started_at,
            } => Py::new(
                py,
                HttpFastDone {
                    exchange,
                    route,
                    outcome: Py::new(py, proxied(py, exchange, outcome))?,
                    body_len,
                    started_at,
                },
            )?
            .into_any(),
            HttpEvent::RouteReleased { route } => {
                Py::new(py, HttpRouteReleased { route })?.into_any()
            }
            HttpEvent::Proxied { exchange, outcome } => {
                Py::new(py, proxied(py, exchange, outcome))?.into_any()
            }
            HttpEvent::Drained { exchange } => Py::new(
                py,
                HttpNotice {
                    exchange,
                    kind: "drained",
                },
            )?
            .into_any(),
            HttpEvent::Gone { exchange } => Py::new(
                py,
                HttpNotice {
                    exchange,
                    kind: "gone",
                },
            )?
            .into_any(),
        };
        slots.push(Slot::Ready(object));
    }
    slots
        .into_iter()
        .map(|slot| match slot {
            Slot::Ready(object) => Ok(object),
            Slot::Batch(batch) => {
                let (route, requests) = std::mem::take(&mut batches[batch]);
                let requests = PyList::new(py, requests)?.unbind();
                Ok(Py::new(py, HttpFastBatch { route, requests })?.into_any())
            }
        })
        .collect()
}

#[pymethods]
impl HttpEngine {
    #[new]
    #[pyo3(signature = (
        *,
        max_header_bytes,
        max_body_bytes,
        idle_timeout,
        request_timeout,
        max_idle_per_upstream = 64,
        upstream_idle = 30.0,
        inline = false,
        max_fast_reports = 256,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_header_bytes: usize,
        max_body_bytes: usize,
        idle_timeout: f64,
        request_timeout: f64,
        max_idle_per_upstream: usize,
        upstream_idle: f64,
        inline: bool,
        max_fast_reports: usize,
    ) -> Result<Self> {
        let config = relay::HttpConfig {
            max_head: max_header_bytes,
            max_body: max_body_bytes,
            idle_timeout: seconds(idle_timeout, "idle_timeout")?,
            request_timeout: seconds(request_timeout, "request_timeout")?,
            max_idle_per_upstream,
            upstream_idle: seconds(upstream_idle, "upstream_idle")?,
            max_fast_reports: max_fast_reports.max(1),
        };
        Ok(HttpEngine {
            inner: relay::HttpEngine::new(config, inline)?,
        })
    }

    #[getter]
    fn notify_fd(&self) -> RawFd {
        self.inner.notify_fd()
    }

    #[getter]
    fn poll_fd(&self) -> RawFd {
        self.inner.poll_fd()
    }

    #[pyo3(signature = (fd, peer, *, tls = None))]
    fn adopt(&self, fd: RawFd, peer: &str, tls: Option<PyRef<'_, TlsServerConfig>>) -> Result<()> {
        let config = tls.map(|t| Arc::clone(&t.inner));
        Ok(self.inner.adopt(fd, peer, config)?)
    }

    #[pyo3(signature = (exchange, status, headers, body, *, close = false))]
    fn respond(
        &self,
        exchange: u64,
        status: u16,
        headers: &[u8],
        body: &[u8],
        close: bool,
    ) -> bool {
        self.inner.respond(exchange, status, headers, body, close)
    }

    fn start(&self, exchange: u64, status: u16, headers: &[u8]) -> bool {
        self.inner.start(exchange, status, headers)
    }

    fn write(&self, exchange: u64, data: &[u8]) -> Option<usize> {
        self.inner.write(exchange, data)
    }

    fn finish(&self, exchange: u64) -> bool {
        self.inner.finish(exchange)
    }

    fn abort(&self, exchange: u64) {
        self.inner.abort(exchange);
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (
        exchange, host, port, request, headers, first_byte_timeout, chunk_timeout, *,
        hold = false, tls = None, server_name = None,
    ))]
    fn proxy(
        &self,
        exchange: u64,
        host: &str,
        port: u16,
        request: &[u8],
        headers: &[u8],
        first_byte_timeout: f64,
        chunk_timeout: f64,
        hold: bool,
        tls: Option<PyRef<'_, TlsClientConfig>>,
        server_name: Option<&str>,
    ) -> PyResult<bool> {
        let ip = host
            .parse()
            .map_err(|_| PyValueError::new_err(format!("{host:?} is not an IP address")))?;
        let spec = relay::ProxySpec {
            addr: SocketAddr::new(ip, port),
            tls: upstream_tls(tls, server_name)?,
            request: Arc::from(request),
            headers: Arc::from(headers),
            first_byte_timeout: seconds(first_byte_timeout, "first_byte_timeout")?,
            chunk_timeout: seconds(chunk_timeout, "chunk_timeout")?,
            hold,
        };
        Ok(self.inner.proxy(exchange, spec))
    }

    /// Relay the requests that carry this key as Python decided, without
    /// asking it (see ``qmesh/_core.pyi``).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (
        authorization, path, model, stream, *, route, app, host, port, request_head,
        upstream_model, headers, first_byte_timeout, chunk_timeout, max_body, max_tokens,
        max_in_flight, ttl, tls = None, server_name = None,
    ))]
    fn route(
        &self,
        authorization: &[u8],
        path: &str,
        model: &str,
        stream: bool,
        route: u64,
        app: &str,
        host: &str,
        port: u16,
        request_head: &[u8],
        upstream_model: &str,
        headers: &[u8],
        first_byte_timeout: f64,
        chunk_timeout: f64,
        max_body: usize,
        max_tokens: u64,
        max_in_flight: usize,
        ttl: f64,
        tls: Option<PyRef<'_, TlsClientConfig>>,
        server_name: Option<&str>,
    ) -> PyResult<()> {
        let ip = host
            .parse()
            .map_err(|_| PyValueError::new_err(format!("{host:?} is not an IP address")))?;
        let key = RouteKey {
            authorization: authorization.to_vec(),
            path: path.to_owned(),
            model: model.to_owned(),
            stream,
        };
        let ttl = seconds(ttl, "ttl")?;
        let now = Instant::now();
        let route = FastRoute {
            id: route,
            app: Arc::from(app),
            max_in_flight,
            addr: SocketAddr::new(ip, port),
            tls: upstream_tls(tls, server_name)?,
            request_head: request_head.to_vec(),
            upstream_model: upstream_model.to_owned(),
            headers: Arc::from(headers),
            first_byte_timeout: seconds(first_byte_timeout, "first_byte_timeout")?,
            chunk_timeout: seconds(chunk_timeout, "chunk_timeout")?,
            max_body,
            max_tokens,
            refresh: now + ttl.mul_f64(RENEW_AT),
            expires: now + ttl,
        };
        self.inner.route(key, route);
        Ok(())
    }

    fn forget_routes(&self) {
        self.inner.forget_routes();
    }

    fn fast_in_flight(&self, app: &str) -> usize {
        self.inner.fast_in_flight(app)
    }

    fn take(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        to_python(py, self.inner.take())
    }

    fn poll(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        to_python(py, self.inner.poll())
    }

    /// ``(clients, upstreams, idle_upstreams, requests, proxied, reused, fast,
    /// held_back)``.
    fn stats(&self) -> (usize, usize, usize, u64, u64, u64, u64, u64) {
        let s = self.inner.stats();
        (
            s.clients,
            s.upstreams,
            s.idle_upstreams,
            s.requests,
            s.proxied,
            s.reused,
            s.fast,
            s.held_back,
        )
    }

    fn close(&self) {
        self.inner.close();
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HttpEngine>()?;
    m.add_class::<HttpRequest>()?;
    m.add_class::<HttpProxied>()?;
    m.add_class::<HttpNotice>()?;
    m.add_class::<HttpFastBatch>()?;
    m.add_class::<HttpFastDone>()?;
    m.add_class::<HttpRouteReleased>()?;
    Ok(())
}
