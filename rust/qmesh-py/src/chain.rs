//! The ledger's hash chain (`qmesh-chain`): rows sealed with the GIL
//! released, so the ledger's writer thread does not hold up the event loop.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyList, PyString};

use qmesh_chain::{Seal, Value};

/// A column's value: what `json.dumps` would write for it. Anything else
/// is a `TypeError`, as `json.dumps` raises for it.
fn value(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // bool before int: True is an int to Python, `true` to JSON.
    if let Ok(flag) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(flag.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        return obj.extract::<i64>().map(Value::Int);
    }
    if let Ok(float) = obj.cast::<PyFloat>() {
        return Ok(Value::Float(float.value()));
    }
    if let Ok(text) = obj.cast::<PyString>() {
        return Ok(Value::Str(text.to_str()?.to_owned()));
    }
    Err(PyTypeError::new_err(format!(
        "a chained row holds None, bool, int, float or str, not {}",
        obj.get_type().name()?
    )))
}

fn row(values: &Bound<'_, PyAny>) -> PyResult<Vec<Value>> {
    values.try_iter()?.map(|item| value(&item?)).collect()
}

fn prev_seal(prev: &[u8]) -> PyResult<Seal> {
    prev.try_into()
        .map_err(|_| PyValueError::new_err("a seal is 32 bytes"))
}

/// The seals of `rows` (each a sequence of column values) with ids from
/// `first_id`, the first chained to `prev`.
#[pyfunction]
pub fn seal_rows<'py>(
    py: Python<'py>,
    key: &[u8],
    prev: &[u8],
    first_id: i64,
    rows: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let prev = prev_seal(prev)?;
    let rows = rows
        .try_iter()?
        .map(|values| row(&values?))
        .collect::<PyResult<Vec<_>>>()?;
    let key = qmesh_chain::key(key);
    let seals = py.detach(|| qmesh_chain::seal_rows(&key, &prev, first_id, &rows));
    PyList::new(py, seals.iter().map(|seal| PyBytes::new(py, seal)))
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
    let values = row(values)?;
    let seal = qmesh_chain::seal(&qmesh_chain::key(key), &prev, row_id, &values);
    Ok(PyBytes::new(py, &seal))
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
    qmesh_chain::canonical(row_id, &row(values)?, &mut out);
    Ok(PyBytes::new(py, &out))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(seal_rows, m)?)?;
    m.add_function(wrap_pyfunction!(seal_row, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_row, m)?)?;
    Ok(())
}
