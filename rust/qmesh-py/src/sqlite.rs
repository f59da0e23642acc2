//! Python's own SQLite connection, driven from Rust with the GIL released.
//!
//! The ledger's writer thread inserts a batch of a thousand rows. Through
//! the `sqlite3` module every parameter is bound with the GIL held, in C
//! code that never lets it go: the event loop's thread, wanting the GIL to
//! serve a request, waited behind each statement's binding (a quarter of a
//! millisecond for 64 rows): wrk's p99 at 64 connections, the Gate on one
//! core, five paired runs, had a median of 6.2 ms that way and 5.6 ms this
//! way (docs/http.md). Here the same statements run on the same connection
//! (so its transaction, locks and `PRAGMA data_version` are untouched) with
//! the GIL released.
//!
//! Two things are borrowed from the interpreter rather than linked:
//! - the library: `sqlite3_*` are looked up through the `_sqlite3`
//!   extension already loaded (`dlopen` with `RTLD_NOLOAD`), so these calls
//!   reach the very copy of SQLite that owns the connection (two copies in
//!   one process would not share their POSIX locks);
//! - the handle: `sqlite3.Connection`'s first field after the object
//!   header is its `sqlite3 *` (CPython 3.11 to 3.14,
//!   `Modules/_sqlite/connection.h`). [`available`] says no on any other
//!   version, and the caller keeps the `sqlite3` module's path.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// Opaque `sqlite3` and `sqlite3_stmt`.
type Db = c_void;
type Stmt = c_void;

const SQLITE_OK: c_int = 0;
const SQLITE_ROW: c_int = 100;
const SQLITE_DONE: c_int = 101;
const SQLITE_CONSTRAINT: c_int = 19;
/// `SQLITE_STATIC`: the bound bytes outlive the statement's use of them.
const STATIC: Destructor = None;

/// The versions whose `sqlite3.Connection` starts with its handle.
const LAYOUT_KNOWN: std::ops::RangeInclusive<(u8, u8)> = (3, 11)..=(3, 14);

type Destructor = Option<unsafe extern "C" fn(*mut c_void)>;
type PrepareFn = unsafe extern "C" fn(
    *mut Db,
    *const c_char,
    c_int,
    *mut *mut Stmt,
    *mut *const c_char,
) -> c_int;
type StmtFn = unsafe extern "C" fn(*mut Stmt) -> c_int;
type BindIntFn = unsafe extern "C" fn(*mut Stmt, c_int, i64) -> c_int;
type BindDoubleFn = unsafe extern "C" fn(*mut Stmt, c_int, f64) -> c_int;
type BindBytesFn =
    unsafe extern "C" fn(*mut Stmt, c_int, *const c_void, c_int, Destructor) -> c_int;
type BindNullFn = unsafe extern "C" fn(*mut Stmt, c_int) -> c_int;
type ErrmsgFn = unsafe extern "C" fn(*mut Db) -> *const c_char;
type DbFn = unsafe extern "C" fn(*mut Db) -> c_int;

/// The functions used, from the interpreter's SQLite (signatures as in
/// sqlite3.h; text is bound through the same shape as blobs).
struct Api {
    prepare_v2: PrepareFn,
    bind_int64: BindIntFn,
    bind_double: BindDoubleFn,
    bind_text: BindBytesFn,
    bind_blob: BindBytesFn,
    bind_null: BindNullFn,
    step: StmtFn,
    reset: StmtFn,
    finalize: StmtFn,
    errmsg: ErrmsgFn,
    get_autocommit: DbFn,
}

/// Looked up once, with the GIL held (the lookup imports `_sqlite3`).
static API: PyOnceLock<Option<Api>> = PyOnceLock::new();

/// Look the functions up in the library `_sqlite3` was loaded with.
fn load(module_file: &str) -> Option<Api> {
    let path = CString::new(module_file).ok()?;
    // SAFETY: RTLD_NOLOAD only finds an object already loaded (the module
    // imported by the caller): nothing is loaded, no initialiser runs. The
    // handle's reference is never dropped, as the module is never unloaded.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    macro_rules! symbol {
        ($name:literal as $kind:ty) => {{
            // SAFETY: a symbol of SQLite's C API, whose signature is the
            // field's (sqlite3.h); a missing one gives None.
            let found = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
            if found.is_null() {
                return None;
            }
            // SAFETY: as above: the function behind the name has this type.
            unsafe { std::mem::transmute::<*mut c_void, $kind>(found) }
        }};
    }
    Some(Api {
        prepare_v2: symbol!("sqlite3_prepare_v2" as PrepareFn),
        bind_int64: symbol!("sqlite3_bind_int64" as BindIntFn),
        bind_double: symbol!("sqlite3_bind_double" as BindDoubleFn),
        bind_text: symbol!("sqlite3_bind_text" as BindBytesFn),
        bind_blob: symbol!("sqlite3_bind_blob" as BindBytesFn),
        bind_null: symbol!("sqlite3_bind_null" as BindNullFn),
        step: symbol!("sqlite3_step" as StmtFn),
        reset: symbol!("sqlite3_reset" as StmtFn),
        finalize: symbol!("sqlite3_finalize" as StmtFn),
        errmsg: symbol!("sqlite3_errmsg" as ErrmsgFn),
        get_autocommit: symbol!("sqlite3_get_autocommit" as DbFn),
    })
}

fn api(py: Python<'_>) -> Option<&'static Api> {
    API.get_or_init(py, || {
        let version = py.version_info();
        if !LAYOUT_KNOWN.contains(&(version.major, version.minor)) {
            return None;
        }
        let module = py.import("_sqlite3").ok()?;
        let file: String = module.getattr("__file__").ok()?.extract().ok()?;
        load(&file)
    })
    .as_ref()
}

/// Whether [`Connection::borrow`] works in this interpreter.
pub fn available(py: Python<'_>) -> bool {
    api(py).is_some()
}

/// A value bound to a statement's parameter.
#[derive(Clone, Copy, Debug)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// What went wrong, raised as the `sqlite3` module's own exception.
#[derive(Debug)]
pub struct SqliteError {
    pub code: c_int,
    pub message: String,
}

impl SqliteError {
    pub fn into_py(self, py: Python<'_>) -> PyErr {
        let class = if self.code & 0xff == SQLITE_CONSTRAINT {
            "IntegrityError"
        } else {
            "OperationalError"
        };
        match py.import("sqlite3").and_then(|m| m.getattr(class)) {
            Ok(kind) => match kind.call1((self.message,)) {
                Ok(err) => PyErr::from_value(err),
                Err(err) => err,
            },
            Err(err) => err,
        }
    }
}

/// A `sqlite3.Connection`'s handle, for as long as the caller keeps the
/// connection to itself (its transaction open, no other thread using it).
pub struct Connection {
    api: &'static Api,
    db: *mut Db,
}

// SAFETY: SQLite connections may move between threads (the library is
// built threadsafe); the caller keeps every other thread off this one
// while it is in use.
unsafe impl Send for Connection {}

impl Connection {
    /// The handle of `conn`, a `sqlite3.Connection` inside a transaction.
    pub fn borrow(conn: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = conn.py();
        let api = api(py)
            .ok_or_else(|| PyRuntimeError::new_err("no native SQLite in this interpreter"))?;
        let class = py.import("sqlite3")?.getattr("Connection")?;
        if !conn.is_instance(&class)? {
            return Err(PyRuntimeError::new_err("not a sqlite3.Connection"));
        }
        // SAFETY: `conn` is a live sqlite3.Connection (checked above), whose
        // layout in this interpreter (checked by `api`) has the `sqlite3 *`
        // right after the object header.
        let db = unsafe {
            let object = conn.as_ptr().cast::<u8>();
            *object
                .add(size_of::<pyo3::ffi::PyObject>())
                .cast::<*mut Db>()
        };
        if db.is_null() {
            return Err(PyRuntimeError::new_err("the SQLite connection is closed"));
        }
        let connection = Self { api, db };
        // SAFETY: a valid, open handle.
        if unsafe { (api.get_autocommit)(db) } != 0 {
            return Err(PyRuntimeError::new_err(
                "native SQLite writes run inside the caller's transaction",
            ));
        }
        Ok(connection)
    }

    fn error(&self, code: c_int) -> SqliteError {
        // SAFETY: errmsg returns a NUL-terminated string owned by the handle.
        let message = unsafe { CStr::from_ptr((self.api.errmsg)(self.db)) };
        SqliteError {
            code,
            message: message.to_string_lossy().into_owned(),
        }
    }

    /// `sql`, one statement, ready to run.
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_>, SqliteError> {
        let length = c_int::try_from(sql.len()).map_err(|_| SqliteError {
            code: 1,
            message: "statement too long".into(),
        })?;
        let mut stmt = std::ptr::null_mut();
        // SAFETY: `sql` is valid for `length` bytes; `stmt` receives a
        // statement (or null) that `Statement` finalizes.
        let code = unsafe {
            (self.api.prepare_v2)(
                self.db,
                sql.as_ptr().cast(),
                length,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        if code != SQLITE_OK || stmt.is_null() {
            return Err(self.error(code));
        }
        Ok(Statement { conn: self, stmt })
    }
}

/// A prepared statement, finalized when dropped.
pub struct Statement<'c> {
    conn: &'c Connection,
    stmt: *mut Stmt,
}

impl Statement<'_> {
    /// Run it once with `params` (one per parameter, in order), expecting
    /// no rows back; it is reset after, ready for the next.
    pub fn execute(&mut self, params: &[Param<'_>]) -> Result<(), SqliteError> {
        let api = self.conn.api;
        for (index, param) in (1..).zip(params) {
            // SAFETY: a live statement; text and blobs outlive the step
            // (SQLITE_STATIC), which reset below ends.
            let code = unsafe {
                match *param {
                    Param::Null => (api.bind_null)(self.stmt, index),
                    Param::Int(value) => (api.bind_int64)(self.stmt, index, value),
                    Param::Real(value) => (api.bind_double)(self.stmt, index, value),
                    Param::Text(text) => (api.bind_text)(
                        self.stmt,
                        index,
                        text.as_ptr().cast(),
                        length(text.len())?,
                        STATIC,
                    ),
                    Param::Blob(blob) => (api.bind_blob)(
                        self.stmt,
                        index,
                        blob.as_ptr().cast(),
                        length(blob.len())?,
                        STATIC,
                    ),
                }
            };
            if code != SQLITE_OK {
                return Err(self.conn.error(code));
            }
        }
        // SAFETY: a live statement with every parameter bound.
        let code = unsafe { (api.step)(self.stmt) };
        let result = match code {
            SQLITE_DONE | SQLITE_ROW => Ok(()),
            _ => Err(self.conn.error(code)), // read before reset clears it
        };
        // SAFETY: as above; its code repeats the step's.
        unsafe { (api.reset)(self.stmt) };
        result
    }
}

fn length(len: usize) -> Result<c_int, SqliteError> {
    c_int::try_from(len).map_err(|_| SqliteError {
        code: 18,
        message: "string or blob too big".into(),
    })
}

impl Drop for Statement<'_> {
    fn drop(&mut self) {
        // SAFETY: finalized once, here.
        unsafe { (self.conn.api.finalize)(self.stmt) };
    }
}
