//! `qmesh._core.AuditQueue`: the Python face of the statement audit's queue
//! (`qmesh-relay`'s `audit.rs`), where the engine threads and Python's
//! relay record statements and the audit's writer takes them.

use std::borrow::Cow;
use std::os::fd::RawFd;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
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

    /// ``(count, blocks)``: up to ``max_records`` records, oldest first,
    /// encoded as the stored blocks, ``(app, alias, first_ts, last_ts,
    /// records, body)`` each: one per (app, alias) and batch, unless it
    /// holds more than :data:`AUDIT_BLOCK_RECORDS`. Hashed, encoded and
    /// compressed without the GIL.
    fn take_blocks<'py>(
        &self,
        py: Python<'py>,
        max_records: usize,
    ) -> Result<(usize, Vec<StoredBlock<'py>>)> {
        let limit = self.inner.limits().max_statement_chars;
        let (count, blocks) = py.detach(|| {
            let taken = self.inner.take(max_records);
            (taken.len(), relay::encode_blocks(taken, limit))
        });
        let blocks = blocks
            .into_iter()
            .map(|block| {
                (
                    block.app.to_string(),
                    block.alias.to_string(),
                    block.first_ts,
                    block.last_ts,
                    block.records,
                    PyBytes::new(py, &block.body),
                )
            })
            .collect();
        Ok((count, blocks))
    }
}

/// ``(app, alias, first_ts, last_ts, records, body)``: one block to store.
type StoredBlock<'py> = (String, String, f64, f64, usize, Bound<'py, PyBytes>);

/// ``(ts, statement, statement_sha256, duration_ms, rows, outcome,
/// session)``: one record of a stored block.
type StoredRecord = (
    f64,
    Option<String>,
    String,
    f64,
    Option<i64>,
    String,
    Option<String>,
);

/// The records of a block :meth:`AuditQueue.take_blocks` made, in the
/// order they were recorded. Raises :class:`AuditBlockError` for a body
/// that is not such a block.
#[pyfunction]
fn audit_block_records(py: Python<'_>, body: &[u8]) -> Result<Vec<StoredRecord>> {
    let records = py.detach(|| relay::decode_block(body))?;
    Ok(records
        .into_iter()
        .map(|r| {
            (
                r.ts,
                r.text,
                r.sha256,
                r.duration_ms,
                r.rows,
                r.outcome,
                r.session,
            )
        })
        .collect())
}

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
    m.add_function(wrap_pyfunction!(audit_block_records, m)?)?;
    m.add("AUDIT_BLOCK_RECORDS", relay::audit_block::MAX_BLOCK_RECORDS)
}
