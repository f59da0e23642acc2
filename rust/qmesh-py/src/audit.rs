//! `qmesh._core.AuditQueue`: the Python face of the statement audit's queue
//! (`qmesh-relay`'s `audit.rs`), where the engine threads and Python's
//! relay record statements and the audit's writer takes them.

use std::borrow::Cow;
use std::collections::hash_map::{Entry, HashMap};
use std::os::fd::RawFd;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;
use pyo3::IntoPyObjectExt;
use qmesh_relay as relay;

use crate::Result;

/// ``(statement, duration_s, rows, outcome)``: one statement as Python's
/// relay records it.
type PyStatement = (Vec<u8>, f64, Option<i64>, String);

/// The bounded queue of audit records (see ``qmesh.pg.audit``): pushes
/// never wait, and records past ``max_records`` or ``max_bytes`` of
/// statements are dropped and counted.
#[pyclass(module = "qmesh._core", name = "AuditQueue", frozen)]
pub struct AuditQueue {
    inner: Arc<relay::AuditQueue>,
}

#[pymethods]
impl AuditQueue {
    #[new]
    fn new(max_records: usize, max_bytes: usize, max_statement_chars: usize) -> Result<Self> {
        if max_records == 0 {
            return Err(PyValueError::new_err("an audit queue holds at least one record").into());
        }
        Ok(AuditQueue {
            inner: relay::AuditQueue::new(relay::AuditLimits {
                max_records,
                max_bytes,
                max_statement_chars,
            })?,
        })
    }

    /// Readable once a record arrives in an empty queue, until :meth:`take`.
    #[getter]
    fn notify_fd(&self) -> RawFd {
        self.inner.fd()
    }

    /// Records accepted since the queue was made.
    #[getter]
    fn recorded(&self) -> u64 {
        self.inner.counts().recorded
    }

    /// Records dropped because the queue was full.
    #[getter]
    fn dropped(&self) -> u64 {
        self.inner.counts().dropped
    }

    /// Records waiting for the writer.
    #[getter]
    fn queued(&self) -> usize {
        self.inner.counts().queued
    }

    /// Queue ``statements`` of one session, ended now; those that do not
    /// fit are dropped (counted in :attr:`dropped`).
    #[pyo3(signature = (app, alias, session, keep_text, statements))]
    fn push(
        &self,
        app: &str,
        alias: &str,
        session: Option<&str>,
        keep_text: bool,
        statements: Vec<PyStatement>,
    ) {
        let author = self.author_for(app, alias, session, keep_text);
        for (statement, duration_s, rows, outcome) in statements {
            author.record(statement.into(), duration_s, rows, Cow::Owned(outcome));
        }
    }

    /// What an engine's pooled stream records its statements with
    /// (``TunnelEngine.attach_native``'s ``audit``).
    fn author(
        &self,
        app: &str,
        alias: &str,
        session: Option<&str>,
        keep_text: bool,
    ) -> AuditAuthor {
        AuditAuthor {
            inner: self.author_for(app, alias, session, keep_text),
        }
    }

    /// ``(count, values)``: up to ``max_records`` records, oldest first, as
    /// rows laid end to end for an INSERT — ``ts, app, alias, statement
    /// (the text, None where only the hash is kept), statement_sha256,
    /// duration_ms, rows, outcome, session`` each. Hashed without the GIL.
    fn take<'py>(
        &self,
        py: Python<'py>,
        max_records: usize,
    ) -> Result<(usize, Bound<'py, PyList>)> {
        let limit = self.inner.limits().max_statement_chars;
        let rows: Vec<relay::AuditRow> = py.detach(|| {
            let taken = self.inner.take(max_records);
            taken
                .into_iter()
                .map(|entry| entry.into_row(limit))
                .collect()
        });
        let mut values: Vec<Bound<'py, PyAny>> = Vec::with_capacity(rows.len() * ROW_WIDTH);
        // A session's names are made once a batch, however its records
        // interleave with other sessions'.
        let mut names: HashMap<*const relay::Who, [Bound<'py, PyAny>; 3]> = HashMap::new();
        // Most rows of a batch share their outcome ("ok"): made once a run.
        let mut outcome: Option<(&str, Bound<'py, PyAny>)> = None;
        for row in &rows {
            let [app, alias, session] = match names.entry(Arc::as_ptr(&row.who)) {
                Entry::Occupied(made) => made.into_mut(),
                Entry::Vacant(place) => place.insert([
                    (*row.who.app).into_bound_py_any(py)?,
                    (*row.who.alias).into_bound_py_any(py)?,
                    row.who.session.as_deref().into_bound_py_any(py)?,
                ]),
            };
            values.push(row.ts.into_bound_py_any(py)?);
            values.push(app.clone());
            values.push(alias.clone());
            values.push(row.text.as_deref().into_bound_py_any(py)?);
            values.push(row.sha256.as_str().into_bound_py_any(py)?);
            values.push(row.duration_ms.into_bound_py_any(py)?);
            values.push(row.rows.into_bound_py_any(py)?);
            let same = outcome
                .as_ref()
                .filter(|(text, _)| *text == row.outcome.as_ref());
            let made = match same {
                Some((_, made)) => made.clone(),
                None => {
                    let made = row.outcome.as_ref().into_bound_py_any(py)?;
                    outcome = Some((row.outcome.as_ref(), made.clone()));
                    made
                }
            };
            values.push(made);
            values.push(session.clone());
        }
        Ok((rows.len(), PyList::new(py, values)?))
    }
}

/// Values per row in :meth:`AuditQueue.take`.
const ROW_WIDTH: usize = 9;

impl AuditQueue {
    fn author_for(
        &self,
        app: &str,
        alias: &str,
        session: Option<&str>,
        keep_text: bool,
    ) -> relay::AuditAuthor {
        relay::AuditAuthor {
            queue: self.inner.clone(),
            who: Arc::new(relay::Who {
                app: app.into(),
                alias: alias.into(),
                session: session.map(Into::into),
                keep_text,
            }),
        }
    }
}

/// One client session's way into an :class:`AuditQueue`, for the engine.
#[pyclass(module = "qmesh._core", name = "AuditAuthor", frozen)]
pub struct AuditAuthor {
    pub(crate) inner: relay::AuditAuthor,
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<AuditQueue>()?;
    m.add_class::<AuditAuthor>()?;
    m.add("AUDIT_ROW_WIDTH", ROW_WIDTH)
}
