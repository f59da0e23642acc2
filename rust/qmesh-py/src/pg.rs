//! `qmesh._core`'s Postgres half: the Python face of `qmesh-pg` (see the
//! `Pg*` names in `qmesh/_core.pyi`).
//!
//! Like the rest of this crate it only converts. The names and SQL of the
//! client's statement messages stay `bytes` (they are in the client's
//! encoding, and the Gate keys and audits by them as sent); other strings
//! (the server's messages, startup parameters) are decoded as UTF-8 with
//! replacement characters, for qmesh to read, never to forward: forwarding
//! always uses the original bytes.
//!
//! The GIL is never released here. The scanner's work is a header check per
//! message plus copying what it reports, a few microseconds for the 64-256
//! KiB a relay reads at once; releasing and re-acquiring the GIL costs more
//! than that, and the Trio loop that calls us has nothing else to run in
//! the meantime.

use std::borrow::Cow;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use qmesh_pg as pg;
use qmesh_pg::encode;

use crate::{Error, Result};

fn text(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

fn tags_arg(tags: Option<&[u8]>) -> pg::TagSet {
    pg::TagSet::from_bytes(tags.unwrap_or(b""))
}

/// What a feed found, as Python objects: ``(tag, raw)`` per reported
/// message, ``(0, bytes)`` per run of bytes to forward (relay mode).
struct PySink<'py> {
    py: Python<'py>,
    events: Vec<Bound<'py, PyTuple>>,
    pending: Vec<u8>,
}

impl<'py> PySink<'py> {
    fn flush(&mut self) -> PyResult<()> {
        if !self.pending.is_empty() {
            let run = PyBytes::new(self.py, &self.pending);
            self.events.push(PyTuple::new(
                self.py,
                [0u8.into_pyobject(self.py)?.into_any(), run.into_any()],
            )?);
            self.pending.clear();
        }
        Ok(())
    }
}

impl pg::Sink for PySink<'_> {
    fn pass(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    fn message(&mut self, tag: u8, raw: &[u8], _complete: bool) {
        // Building a tuple of an int and a bytes cannot fail short of
        // memory exhaustion; a failure then surfaces from `flush` below.
        let _ = self.flush();
        let event = PyTuple::new(
            self.py,
            [
                tag.into_pyobject(self.py).expect("small int").into_any(),
                PyBytes::new(self.py, raw).into_any(),
            ],
        );
        if let Ok(event) = event {
            self.events.push(event);
        }
    }
}

/// Finds Postgres message boundaries in one direction of one connection
/// and reports the kinds asked for (see ``qmesh/_core.pyi``).
#[pyclass(module = "qmesh._core", name = "PgScanner")]
pub struct PgScanner {
    inner: pg::Scanner,
}

#[pymethods]
impl PgScanner {
    #[new]
    #[pyo3(signature = (
        *,
        frontend,
        full = None,
        peek = None,
        relay = false,
        max_message = 268435456,
        peek_max = 1024,
    ))]
    fn new(
        frontend: bool,
        full: Option<&[u8]>,
        peek: Option<&[u8]>,
        relay: bool,
        max_message: usize,
        peek_max: usize,
    ) -> Result<Self> {
        let direction = if frontend {
            pg::Direction::Frontend
        } else {
            pg::Direction::Backend
        };
        let config = pg::ScannerConfig {
            direction,
            full: tags_arg(full),
            peek: tags_arg(peek),
            relay,
            max_message,
            peek_max,
        };
        Ok(PgScanner {
            inner: pg::Scanner::new(config)?,
        })
    }

    #[getter]
    fn full<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.config().full.to_bytes())
    }

    #[setter]
    fn set_full(&mut self, tags: &[u8]) {
        self.inner.set_full(pg::TagSet::from_bytes(tags));
    }

    #[getter]
    fn peek<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.config().peek.to_bytes())
    }

    #[setter]
    fn set_peek(&mut self, tags: &[u8]) {
        self.inner.set_peek(pg::TagSet::from_bytes(tags));
    }

    #[getter]
    fn relay(&self) -> bool {
        self.inner.config().relay
    }

    #[getter]
    fn messages(&self) -> u64 {
        self.inner.messages()
    }

    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }

    #[getter]
    fn in_message(&self) -> bool {
        self.inner.in_message()
    }

    fn feed<'py>(
        &mut self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let data: Cow<'_, [u8]> = super::input(data)?;
        let mut sink = PySink {
            py,
            events: Vec::new(),
            pending: Vec::new(),
        };
        self.inner.feed(&data, &mut sink).map_err(Error::from)?;
        sink.flush()?;
        PyList::new(py, sink.events)
    }

    fn eof(&self) -> Result<()> {
        Ok(self.inner.eof()?)
    }

    fn __repr__(&self) -> String {
        let config = self.inner.config();
        format!(
            "<PgScanner {} full={:?} peek={:?} relay={} messages={} buffered={}>",
            config.direction.name(),
            text(&config.full.to_bytes()),
            text(&config.peek.to_bytes()),
            config.relay,
            self.inner.messages(),
            self.inner.buffered(),
        )
    }
}

/// A packet of the startup phase (see ``parse_startup``).
#[pyclass(module = "qmesh._core", name = "PgStartup", frozen, get_all)]
pub struct PgStartup {
    /// ``"startup"``, ``"ssl"``, ``"gssenc"`` or ``"cancel"``.
    kind: &'static str,
    /// Bytes the packet took.
    length: usize,
    /// The protocol version of a StartupMessage (``major << 16 | minor``), else 0.
    version: u32,
    /// A StartupMessage's parameters in the order sent.
    params: Vec<(String, String)>,
    /// A CancelRequest's process id, else 0.
    pid: u32,
    /// A CancelRequest's secret key, else empty.
    secret: Py<PyBytes>,
}

#[pymethods]
impl PgStartup {
    fn __repr__(&self) -> String {
        // Parameter values are the client's and harmless, but a cancel
        // secret is a capability: never print it.
        let names: Vec<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
        format!(
            "<PgStartup {} length={} version={:#x} params={:?} pid={}>",
            self.kind, self.length, self.version, names, self.pid
        )
    }
}

#[pyfunction]
#[pyo3(signature = (data, max_length = 10000))]
fn parse_startup(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    max_length: usize,
) -> PyResult<Option<PgStartup>> {
    let data = super::input(data)?;
    let Some((packet, length)) = pg::parse_startup(&data, max_length).map_err(Error::from)? else {
        return Ok(None);
    };
    let mut out = PgStartup {
        kind: "startup",
        length,
        version: 0,
        params: Vec::new(),
        pid: 0,
        secret: PyBytes::new(py, b"").unbind(),
    };
    match packet {
        pg::Startup::SslRequest => out.kind = "ssl",
        pg::Startup::GssEncRequest => out.kind = "gssenc",
        pg::Startup::CancelRequest { pid, secret } => {
            out.kind = "cancel";
            out.pid = pid;
            out.secret = PyBytes::new(py, secret).unbind();
        }
        pg::Startup::StartupMessage { version, params } => {
            out.version = version;
            out.params = params
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
        }
    }
    Ok(Some(out))
}

// -- builders ------------------------------------------------------------

/// A builder's result as Python ``bytes``, or its error raised.
fn encoded(py: Python<'_>, built: pg::Result<Vec<u8>>) -> PyResult<Bound<'_, PyBytes>> {
    Ok(PyBytes::new(py, &built.map_err(Error::from)?))
}

fn char_arg(value: &str, what: &str) -> PyResult<u8> {
    match value.as_bytes() {
        [c] => Ok(*c),
        _ => Err(PyValueError::new_err(format!(
            "{what} must be one ASCII character"
        ))),
    }
}

#[pyfunction]
fn encode_message<'py>(
    py: Python<'py>,
    tag: u8,
    body: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let body = super::input(body)?;
    encoded(py, encode::message(tag, &body))
}

#[pyfunction]
#[pyo3(signature = (params, version = 196608))]
fn encode_startup<'py>(
    py: Python<'py>,
    params: Vec<(String, String)>,
    version: u32,
) -> PyResult<Bound<'py, PyBytes>> {
    let refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    encoded(py, encode::startup_message(version, &refs))
}

#[pyfunction]
fn encode_cancel_request<'py>(
    py: Python<'py>,
    pid: u32,
    secret: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    encoded(py, encode::cancel_request(pid, secret))
}

#[pyfunction]
#[pyo3(signature = (fields, *, notice = false))]
fn encode_error_response<'py>(
    py: Python<'py>,
    fields: Vec<(String, String)>,
    notice: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut coded = Vec::with_capacity(fields.len());
    for (code, value) in &fields {
        coded.push((char_arg(code, "a field code")?, value.as_str()));
    }
    let tag = if notice { b'N' } else { b'E' };
    encoded(py, encode::error_response(tag, &coded))
}

#[pyfunction]
fn encode_query<'py>(py: Python<'py>, sql: &str) -> PyResult<Bound<'py, PyBytes>> {
    encoded(py, encode::query(sql.as_bytes()))
}

#[pyfunction]
#[pyo3(signature = (name, sql, param_types = Vec::new()))]
fn encode_parse<'py>(
    py: Python<'py>,
    name: &[u8],
    sql: &str,
    param_types: Vec<u32>,
) -> PyResult<Bound<'py, PyBytes>> {
    encoded(py, encode::parse(name, sql.as_bytes(), &param_types))
}

#[pyfunction]
#[pyo3(signature = (code, data = Vec::new()))]
fn encode_authentication<'py>(
    py: Python<'py>,
    code: i32,
    data: Vec<u8>,
) -> PyResult<Bound<'py, PyBytes>> {
    encoded(py, encode::authentication(code, &data))
}

#[pyfunction]
fn encode_sasl_initial_response<'py>(
    py: Python<'py>,
    mechanism: &str,
    data: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    encoded(py, encode::sasl_initial_response(mechanism, data))
}

#[pyfunction]
fn encode_backend_key_data<'py>(
    py: Python<'py>,
    pid: u32,
    secret: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    encoded(py, encode::backend_key_data(pid, secret))
}

#[pyfunction]
fn encode_parameter_status<'py>(
    py: Python<'py>,
    name: &str,
    value: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    encoded(
        py,
        encode::parameter_status(name.as_bytes(), value.as_bytes()),
    )
}

#[pyfunction]
fn encode_ready_for_query<'py>(py: Python<'py>, status: &str) -> PyResult<Bound<'py, PyBytes>> {
    let status = char_arg(status, "status")?;
    encoded(py, encode::ready_for_query(status))
}

#[pyfunction]
fn encode_negotiate_protocol_version<'py>(
    py: Python<'py>,
    newest_minor: u32,
    unrecognized: Vec<String>,
) -> PyResult<Bound<'py, PyBytes>> {
    let refs: Vec<&str> = unrecognized.iter().map(String::as_str).collect();
    encoded(py, encode::negotiate_protocol_version(newest_minor, &refs))
}

// -- field parsers (message bodies, without the 5-byte header) -------------

fn frontend<'a>(tag: u8, body: &'a [u8]) -> Result<pg::Frontend<'a>> {
    Ok(pg::Frontend::parse(tag, body)?)
}

fn backend<'a>(tag: u8, body: &'a [u8]) -> Result<pg::Backend<'a>> {
    Ok(pg::Backend::parse(tag, body)?)
}

// Names and SQL from the client come back as `bytes`: they are in the
// client's encoding, the relay keys its statement and portal tables by them
// and records them in the audit as sent.

#[pyfunction]
fn parse_query<'py>(py: Python<'py>, body: &[u8]) -> Result<Bound<'py, PyBytes>> {
    match frontend(b'Q', body)? {
        pg::Frontend::Query { sql } => Ok(PyBytes::new(py, sql)),
        _ => unreachable!("tag Q parses as Query"),
    }
}

type PyParse<'py> = (Bound<'py, PyBytes>, Bound<'py, PyBytes>, Vec<u32>);

#[pyfunction]
fn parse_parse<'py>(py: Python<'py>, body: &[u8]) -> Result<PyParse<'py>> {
    match frontend(b'P', body)? {
        pg::Frontend::Parse {
            name,
            sql,
            param_types,
        } => Ok((PyBytes::new(py, name), PyBytes::new(py, sql), param_types)),
        _ => unreachable!("tag P parses as Parse"),
    }
}

type PyBind<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Vec<i16>,
    Vec<Option<Bound<'py, PyBytes>>>,
    Vec<i16>,
);

#[pyfunction]
fn parse_bind<'py>(py: Python<'py>, body: &[u8]) -> Result<PyBind<'py>> {
    match frontend(b'B', body)? {
        pg::Frontend::Bind(b) => Ok((
            PyBytes::new(py, b.portal),
            PyBytes::new(py, b.statement),
            b.param_formats,
            b.params
                .into_iter()
                .map(|p| p.map(|p| PyBytes::new(py, p)))
                .collect(),
            b.result_formats,
        )),
        _ => unreachable!("tag B parses as Bind"),
    }
}

type PyNames<'py> = (Bound<'py, PyBytes>, Bound<'py, PyBytes>);

#[pyfunction]
fn parse_bind_names<'py>(py: Python<'py>, body: &[u8]) -> Option<PyNames<'py>> {
    pg::frontend::bind_names(body).map(|(p, s)| (PyBytes::new(py, p), PyBytes::new(py, s)))
}

#[pyfunction]
fn parse_execute<'py>(py: Python<'py>, body: &[u8]) -> Result<(Bound<'py, PyBytes>, i32)> {
    match frontend(b'E', body)? {
        pg::Frontend::Execute { portal, max_rows } => Ok((PyBytes::new(py, portal), max_rows)),
        _ => unreachable!("tag E parses as Execute"),
    }
}

/// ``(kind, name)`` of a Close (tag `C`) or Describe (tag `D`) body.
fn kind_and_name<'py>(
    py: Python<'py>,
    tag: u8,
    body: &[u8],
) -> Result<(String, Bound<'py, PyBytes>)> {
    match frontend(tag, body)? {
        pg::Frontend::Close { kind, name } | pg::Frontend::Describe { kind, name } => {
            Ok(((kind as char).to_string(), PyBytes::new(py, name)))
        }
        _ => unreachable!("tag {} parses as Close or Describe", tag as char),
    }
}

#[pyfunction]
fn parse_close<'py>(py: Python<'py>, body: &[u8]) -> Result<(String, Bound<'py, PyBytes>)> {
    kind_and_name(py, b'C', body)
}

#[pyfunction]
fn parse_describe<'py>(py: Python<'py>, body: &[u8]) -> Result<(String, Bound<'py, PyBytes>)> {
    kind_and_name(py, b'D', body)
}

#[pyfunction]
fn parse_function_call(body: &[u8]) -> Result<u32> {
    match frontend(b'F', body)? {
        pg::Frontend::FunctionCall { oid, .. } => Ok(oid),
        _ => unreachable!("tag F parses as FunctionCall"),
    }
}

#[pyfunction]
fn parse_sasl_initial_response<'py>(
    py: Python<'py>,
    body: &[u8],
) -> Result<(String, Option<Bound<'py, PyBytes>>)> {
    let (mechanism, data) = pg::frontend::sasl_initial_response(body)?;
    Ok((mechanism.to_owned(), data.map(|d| PyBytes::new(py, d))))
}

#[pyfunction]
fn parse_password<'py>(py: Python<'py>, body: &[u8]) -> Result<Bound<'py, PyBytes>> {
    Ok(PyBytes::new(py, pg::frontend::password_message(body)?))
}

#[pyfunction]
fn parse_authentication<'py>(py: Python<'py>, body: &[u8]) -> Result<(i32, Bound<'py, PyBytes>)> {
    if body.len() < 4 {
        return Err(
            pg::Error::Malformed("Authentication: request code runs past the end".into()).into(),
        );
    }
    // Validate the shape for the codes that have one.
    pg::backend::authentication(body)?;
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    Ok((code, PyBytes::new(py, &body[4..])))
}

#[pyfunction]
fn parse_sasl_mechanisms(body: &[u8]) -> Result<Vec<String>> {
    match pg::backend::authentication(body)? {
        pg::Authentication::Sasl { mechanisms } => {
            Ok(mechanisms.into_iter().map(str::to_owned).collect())
        }
        _ => Err(pg::Error::Malformed("Authentication: not a SASL request".into()).into()),
    }
}

#[pyfunction]
fn parse_parameter_status(body: &[u8]) -> Result<(String, String)> {
    let (name, value) = pg::backend::parameter_status(body)?;
    Ok((text(name), text(value)))
}

#[pyfunction]
fn parse_backend_key_data<'py>(py: Python<'py>, body: &[u8]) -> Result<(u32, Bound<'py, PyBytes>)> {
    let (pid, secret) = pg::backend::backend_key_data(body)?;
    Ok((pid, PyBytes::new(py, secret)))
}

#[pyfunction]
fn parse_ready_for_query(body: &[u8]) -> Result<String> {
    Ok((pg::backend::ready_for_query(body)? as char).to_string())
}

#[pyfunction]
fn parse_command_complete(body: &[u8]) -> Result<(String, Option<u64>)> {
    let tag = pg::backend::command_complete(body)?;
    Ok((text(tag), pg::command_rows(tag)))
}

#[pyfunction]
fn parse_error_fields<'py>(py: Python<'py>, body: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let fields = pg::backend::notice_fields(body).map_err(Error::from)?;
    let out = PyDict::new(py);
    for (code, value) in fields {
        out.set_item((code as char).to_string(), text(value))?;
    }
    Ok(out)
}

#[pyfunction]
fn parse_notification(body: &[u8]) -> Result<(u32, String, String)> {
    let (pid, channel, payload) = pg::backend::notification(body)?;
    Ok((pid, text(channel), text(payload)))
}

type PyField = (String, u32, i16, u32, i16, i32, i16);

#[pyfunction]
fn parse_row_description(body: &[u8]) -> Result<Vec<PyField>> {
    match backend(b'T', body)? {
        pg::Backend::RowDescription(fields) => Ok(fields
            .into_iter()
            .map(|f| {
                (
                    text(f.name),
                    f.table_oid,
                    f.column,
                    f.type_oid,
                    f.type_size,
                    f.type_modifier,
                    f.format,
                )
            })
            .collect()),
        _ => unreachable!("tag T parses as RowDescription"),
    }
}

#[pyfunction]
fn parse_data_row<'py>(py: Python<'py>, body: &[u8]) -> Result<Vec<Option<Bound<'py, PyBytes>>>> {
    match backend(b'D', body)? {
        pg::Backend::DataRow(values) => Ok(values
            .into_iter()
            .map(|v| v.map(|v| PyBytes::new(py, v)))
            .collect()),
        _ => unreachable!("tag D parses as DataRow"),
    }
}

#[pyfunction]
fn parse_copy_response(body: &[u8]) -> Result<(u8, Vec<i16>)> {
    Ok(pg::backend::copy_response(body)?)
}

#[pyfunction]
fn parse_negotiate_protocol_version(body: &[u8]) -> Result<(u32, Vec<String>)> {
    let (minor, options) = pg::backend::negotiate_protocol_version(body)?;
    Ok((minor, options.into_iter().map(str::to_owned).collect()))
}

/// Add the Postgres classes, functions and constants to the module (its
/// exceptions are in `error.rs`, with every other crate's).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PgScanner>()?;
    m.add_class::<PgStartup>()?;
    m.add_function(wrap_pyfunction!(parse_startup, m)?)?;
    m.add_function(wrap_pyfunction!(encode_message, m)?)?;
    m.add_function(wrap_pyfunction!(encode_startup, m)?)?;
    m.add_function(wrap_pyfunction!(encode_cancel_request, m)?)?;
    m.add_function(wrap_pyfunction!(encode_error_response, m)?)?;
    m.add_function(wrap_pyfunction!(encode_query, m)?)?;
    m.add_function(wrap_pyfunction!(encode_parse, m)?)?;
    m.add_function(wrap_pyfunction!(encode_authentication, m)?)?;
    m.add_function(wrap_pyfunction!(encode_sasl_initial_response, m)?)?;
    m.add_function(wrap_pyfunction!(encode_backend_key_data, m)?)?;
    m.add_function(wrap_pyfunction!(encode_parameter_status, m)?)?;
    m.add_function(wrap_pyfunction!(encode_ready_for_query, m)?)?;
    m.add_function(wrap_pyfunction!(encode_negotiate_protocol_version, m)?)?;
    m.add_function(wrap_pyfunction!(parse_query, m)?)?;
    m.add_function(wrap_pyfunction!(parse_parse, m)?)?;
    m.add_function(wrap_pyfunction!(parse_bind, m)?)?;
    m.add_function(wrap_pyfunction!(parse_bind_names, m)?)?;
    m.add_function(wrap_pyfunction!(parse_execute, m)?)?;
    m.add_function(wrap_pyfunction!(parse_close, m)?)?;
    m.add_function(wrap_pyfunction!(parse_describe, m)?)?;
    m.add_function(wrap_pyfunction!(parse_function_call, m)?)?;
    m.add_function(wrap_pyfunction!(parse_sasl_initial_response, m)?)?;
    m.add_function(wrap_pyfunction!(parse_password, m)?)?;
    m.add_function(wrap_pyfunction!(parse_authentication, m)?)?;
    m.add_function(wrap_pyfunction!(parse_sasl_mechanisms, m)?)?;
    m.add_function(wrap_pyfunction!(parse_parameter_status, m)?)?;
    m.add_function(wrap_pyfunction!(parse_backend_key_data, m)?)?;
    m.add_function(wrap_pyfunction!(parse_ready_for_query, m)?)?;
    m.add_function(wrap_pyfunction!(parse_command_complete, m)?)?;
    m.add_function(wrap_pyfunction!(parse_error_fields, m)?)?;
    m.add_function(wrap_pyfunction!(parse_notification, m)?)?;
    m.add_function(wrap_pyfunction!(parse_row_description, m)?)?;
    m.add_function(wrap_pyfunction!(parse_data_row, m)?)?;
    m.add_function(wrap_pyfunction!(parse_copy_response, m)?)?;
    m.add_function(wrap_pyfunction!(parse_negotiate_protocol_version, m)?)?;

    m.add("PG_PROTOCOL_3_0", pg::PROTOCOL_3_0)?;
    m.add("PG_HEADER_LEN", pg::HEADER_LEN)?;
    m.add("PG_MAX_STARTUP_PACKET", pg::MAX_STARTUP_PACKET)?;
    m.add("PG_DEFAULT_MAX_MESSAGE", pg::DEFAULT_MAX_MESSAGE)?;
    m.add("PG_MAX_MESSAGE_LIMIT", pg::MAX_MESSAGE_LIMIT)?;
    m.add("PG_FRONTEND_TAGS", PyBytes::new(py, pg::FRONTEND_TAGS))?;
    m.add("PG_BACKEND_TAGS", PyBytes::new(py, pg::BACKEND_TAGS))?;
    m.add("PG_SSL_REQUEST", PyBytes::new(py, &encode::ssl_request()))?;
    m.add(
        "PG_GSSENC_REQUEST",
        PyBytes::new(py, &encode::gssenc_request()),
    )?;

    // The stub's alias exists at runtime too (like `Frame` in lib.rs).
    let event = py.get_type::<PyTuple>().get_item((
        py.get_type::<pyo3::types::PyInt>(),
        py.get_type::<PyBytes>(),
    ))?;
    m.add("PgEvent", event)?;
    Ok(())
}

// The `#[pyo3(signature)]` defaults above are literals so they show in
// `__text_signature__`; keep them equal to the crate's constants.
const _: () = assert!(pg::DEFAULT_MAX_MESSAGE == 268_435_456);
const _: () = assert!(pg::DEFAULT_PEEK_MAX == 1024);
const _: () = assert!(pg::MAX_STARTUP_PACKET == 10_000);
const _: () = assert!(pg::PROTOCOL_3_0 == 196_608);
