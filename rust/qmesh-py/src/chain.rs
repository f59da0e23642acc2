//! The ledger's hash chain (`qmesh-chain`): rows sealed (and on SQLite
//! inserted) with the GIL released, so the ledger's writer thread does not
//! hold up the event loop.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyFloat, PyInt, PyList, PyString, PyTuple};

use std::ops::Range;

use qmesh_chain::{Seal, Value};
use ring::hmac;

use crate::sqlite;

/// `obj` as a chained row's value. Anything but None, bool, int, float or
/// str is a `TypeError`, as `json.dumps` raises for it.
fn value<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Value<'a>> {
    Ok(if obj.is_none() {
        Value::Null
    } else if let Ok(flag) = obj.cast::<PyBool>() {
        // bool before int: True is an int to Python, `true` to JSON.
        Value::Bool(flag.is_true())
    } else if obj.is_instance_of::<PyInt>() {
        Value::Int(obj.extract::<i64>()?)
    } else if let Ok(float) = obj.cast::<PyFloat>() {
        Value::Float(float.value())
    } else if let Ok(text) = obj.cast::<PyString>() {
        Value::Str(text.to_str()?)
    } else {
        return Err(PyTypeError::new_err(format!(
            "a chained row holds None, bool, int, float or str, not {}",
            obj.get_type().name()?
        )));
    })
}

fn prev_seal(prev: &[u8]) -> PyResult<Seal> {
    prev.try_into()
        .map_err(|_| PyValueError::new_err("a seal is 32 bytes"))
}

/// A value read out of Python, its text in the batch's arena.
enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    Real(f64),
    Text(std::ops::Range<usize>),
}

/// Rows read out of Python: a copy of each value, so that encoding,
/// sealing and inserting them can run with the GIL released. Reading is
/// the only part that holds it (about half a millisecond for a thousand
/// ledger rows).
#[derive(Default)]
struct ReadRows {
    cells: Vec<Cell>,
    /// Where each row's cells end.
    ends: Vec<usize>,
    text: String,
}

/// Rows per INSERT statement: one statement of many rows costs SQLite far
/// less per row than a statement per row.
const ROWS_PER_STATEMENT: usize = 64;

impl ReadRows {
    fn read<'py>(rows: impl IntoIterator<Item = &'py Bound<'py, PyAny>>) -> PyResult<Self> {
        let mut read = Self::default();
        for row in rows {
            if let Ok(tuple) = row.cast::<PyTuple>() {
                for item in tuple.iter_borrowed() {
                    read.push(&item)?;
                }
            } else {
                for item in row.try_iter()? {
                    read.push(&item?)?;
                }
            }
            read.ends.push(read.cells.len());
        }
        Ok(read)
    }

    fn push(&mut self, item: &Bound<'_, PyAny>) -> PyResult<()> {
        let cell = match value(item)? {
            Value::Null => Cell::Null,
            Value::Bool(flag) => Cell::Bool(flag),
            Value::Int(number) => Cell::Int(number),
            Value::Float(number) => Cell::Real(number),
            Value::Str(text) => {
                let start = self.text.len();
                self.text.push_str(text);
                Cell::Text(start..self.text.len())
            }
        };
        self.cells.push(cell);
        Ok(())
    }

    fn rows(&self) -> usize {
        self.ends.len()
    }

    fn row(&self, row: usize) -> &[Cell] {
        let start = if row == 0 { 0 } else { self.ends[row - 1] };
        &self.cells[start..self.ends[row]]
    }

    /// How many values every row has; None if they differ (or none are).
    fn width(&self) -> Option<usize> {
        let first = self.ends.first().copied()?;
        (0..self.rows())
            .all(|row| self.row(row).len() == first)
            .then_some(first)
    }

    /// `cell` as sealed: as `json.dumps` writes the Python value.
    fn sealed_value(&self, cell: &Cell) -> Value<'_> {
        match cell {
            Cell::Null => Value::Null,
            Cell::Bool(flag) => Value::Bool(*flag),
            Cell::Int(number) => Value::Int(*number),
            Cell::Real(number) => Value::Float(*number),
            Cell::Text(range) => Value::Str(&self.text[range.clone()]),
        }
    }

    /// `cell` as stored: as the `sqlite3` module binds the Python value.
    fn bound_value(&self, cell: &Cell) -> sqlite::Param<'_> {
        match cell {
            Cell::Null => sqlite::Param::Null,
            Cell::Bool(flag) => sqlite::Param::Int(i64::from(*flag)),
            Cell::Int(number) => sqlite::Param::Int(*number),
            Cell::Real(number) => sqlite::Param::Real(*number),
            Cell::Text(range) => sqlite::Param::Text(&self.text[range.clone()]),
        }
    }

    /// Append the canonical JSON of `[row_id, *row]` to `out`.
    fn encode(&self, row: usize, row_id: i64, out: &mut Vec<u8>) {
        qmesh_chain::begin_row(row_id, out);
        for cell in self.row(row) {
            qmesh_chain::push_value(self.sealed_value(cell), out);
        }
        qmesh_chain::end_row(out);
    }

    /// The seals of the rows in `range`, the first chained to `prev`; row
    /// `i`'s id is `first_id + i`.
    fn seal(&self, key: &hmac::Key, prev: &Seal, range: Range<usize>, first_id: i64) -> Vec<Seal> {
        let mut encoded = Vec::with_capacity(range.len() * 512);
        let mut ends = Vec::with_capacity(range.len());
        for row in range {
            self.encode(row, first_id + row as i64, &mut encoded);
            ends.push(encoded.len());
        }
        qmesh_chain::seal_encoded(key, prev, &encoded, &ends)
    }

    /// Seal the rows (the first chained to `prev`, ids from `first_id`)
    /// and insert them, `width` values each, with `insert` (`INSERT INTO
    /// table (columns)`), each as its id, values, the seal before it and
    /// its own; returns the last seal. A statement at a time; with
    /// `take_turns`, the core handed on after each (`yield_now`): the
    /// ledger's writer shares it with an event loop that makes way between
    /// its rounds (`qmesh.background.make_way`), and the kernel (a 250 Hz
    /// tick, no preemption between ticks) would otherwise let it run a
    /// whole batch, or 4 ms, while every request waits. With nothing else
    /// to run, a yield returns at once.
    #[allow(clippy::too_many_arguments)] // each is the statement's own
    fn insert(
        &self,
        conn: &sqlite::Connection,
        insert: &str,
        width: usize,
        key: &hmac::Key,
        prev: Seal,
        first_id: i64,
        take_turns: bool,
    ) -> Result<Seal, sqlite::SqliteError> {
        let one = format!("({})", vec!["?"; width + 3].join(", "));
        let statement_for = |rows: usize| {
            conn.prepare(&format!(
                "{insert} VALUES {}",
                vec![one.as_str(); rows].join(", ")
            ))
        };
        let mut full = None;
        let mut last = prev;
        let mut start = 0;
        while start < self.rows() {
            let rows = ROWS_PER_STATEMENT.min(self.rows() - start);
            let seals = self.seal(key, &last, start..start + rows, first_id);
            let mut params = Vec::with_capacity(rows * (width + 3));
            for (i, row) in (start..start + rows).enumerate() {
                params.push(sqlite::Param::Int(first_id + row as i64));
                params.extend(self.row(row).iter().map(|cell| self.bound_value(cell)));
                params.push(sqlite::Param::Blob(if i == 0 {
                    &last
                } else {
                    &seals[i - 1]
                }));
                params.push(sqlite::Param::Blob(&seals[i]));
            }
            if rows == ROWS_PER_STATEMENT {
                if full.is_none() {
                    full = Some(statement_for(rows)?);
                }
                full.as_mut().expect("prepared above").execute(&params)?;
            } else {
                statement_for(rows)?.execute(&params)?;
            }
            last = *seals.last().expect("a statement has rows");
            start += rows;
            if take_turns {
                std::thread::yield_now();
            }
        }
        Ok(last)
    }
}

/// `rows` sealed (ids from `first_id`, the first chained to `prev`) and
/// laid out for one INSERT: each row's id, its values, the seal before it
/// and its own, end to end; and the last seal. Seals are bytearrays
/// because sqlite3 binds those at once, where it first looks bytes up
/// among its adapters. With the Python loop this replaces: a ledger row's
/// write in the writer thread took 12.9 µs of CPU, now 11.0 (medians of
/// 14 paired batches).
#[pyfunction]
pub fn seal_rows<'py>(
    py: Python<'py>,
    key: &[u8],
    prev: &[u8],
    first_id: i64,
    rows: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyBytes>)> {
    let prev = prev_seal(prev)?;
    let rows = rows.try_iter()?.collect::<PyResult<Vec<_>>>()?;
    let read = ReadRows::read(&rows)?;
    let seals = py.detach(|| read.seal(&qmesh_chain::key(key), &prev, 0..read.rows(), first_id));
    let out = PyList::empty(py);
    let mut before = PyByteArray::new(py, &prev).into_any();
    for ((row, seal), row_id) in rows.iter().zip(&seals).zip(first_id..) {
        out.append(row_id)?;
        for value in row.try_iter()? {
            out.append(value?)?;
        }
        let sealed = PyByteArray::new(py, seal).into_any();
        out.append(&before)?;
        out.append(&sealed)?;
        before = sealed;
    }
    let last = seals.last().unwrap_or(&prev);
    Ok((out, PyBytes::new(py, last)))
}

/// The seal of one row chained to `prev`.
#[pyfunction]
pub fn seal_row<'py>(
    py: Python<'py>,
    key: &[u8],
    prev: &[u8],
    row_id: i64,
    values: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let prev = prev_seal(prev)?;
    let seals = ReadRows::read([values])?.seal(&qmesh_chain::key(key), &prev, 0..1, row_id);
    Ok(PyBytes::new(py, &seals[0]))
}

/// `rows` sealed as [`seal_rows`] seals them (ids from `first_id`, the
/// first chained to `prev`) and inserted by `insert` (`INSERT INTO table
/// (columns)`, the columns: an id, the values, the seal before and the
/// row's own) on `conn`, a `sqlite3.Connection` inside a transaction that
/// the caller keeps to itself. Only reading the rows holds the GIL. With
/// `take_turns`, the core is handed on after each statement. Returns the
/// last seal.
#[pyfunction]
#[pyo3(signature = (conn, insert, key, prev, first_id, rows, *, take_turns = false))]
#[allow(clippy::too_many_arguments)] // Python's signature, keyword and all
pub fn insert_sealed<'py>(
    py: Python<'py>,
    conn: &Bound<'py, PyAny>,
    insert: &str,
    key: &[u8],
    prev: &[u8],
    first_id: i64,
    rows: &Bound<'py, PyAny>,
    take_turns: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let prev = prev_seal(prev)?;
    let connection = sqlite::Connection::borrow(conn)?;
    let rows = rows.try_iter()?.collect::<PyResult<Vec<_>>>()?;
    let read = ReadRows::read(&rows)?;
    if read.rows() == 0 {
        return Ok(PyBytes::new(py, &prev));
    }
    let width = read
        .width()
        .ok_or_else(|| PyValueError::new_err("the rows of a batch differ in length"))?;
    let key = qmesh_chain::key(key);
    let last = py
        .detach(move || read.insert(&connection, insert, width, &key, prev, first_id, take_turns))
        .map_err(|err: sqlite::SqliteError| err.into_py(py))?;
    Ok(PyBytes::new(py, &last))
}

/// Whether [`insert_sealed`] can drive this interpreter's `sqlite3`.
#[pyfunction]
pub fn native_sqlite(py: Python<'_>) -> bool {
    sqlite::available(py)
}

/// The canonical JSON a row is sealed over (the tests hold it to
/// `json.dumps`).
#[pyfunction]
pub fn canonical_row<'py>(
    py: Python<'py>,
    row_id: i64,
    values: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut out = Vec::new();
    ReadRows::read([values])?.encode(0, row_id, &mut out);
    Ok(PyBytes::new(py, &out))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(seal_rows, m)?)?;
    m.add_function(wrap_pyfunction!(seal_row, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_row, m)?)?;
    m.add_function(wrap_pyfunction!(insert_sealed, m)?)?;
    m.add_function(wrap_pyfunction!(native_sqlite, m)?)?;
    Ok(())
}
