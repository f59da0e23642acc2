//! The hash chain of the Gate's ledger and audit tables.
//!
//! Each row is sealed as `HMAC-SHA256(key, prev_hash || canonical)`, where
//! `canonical` is the JSON array `[row_id, *values]` exactly as Python's
//! `json.dumps(..., separators=(",", ":"), ensure_ascii=False)` writes it,
//! UTF-8 encoded. Rows written before this crate existed were sealed by
//! Python, and `qmesh ledger verify` must keep accepting them, so the
//! encoding is Python's to the byte: floats in `repr` form (`1e-05`,
//! `1.5e+16`, `0.1`, `100.0`, `Infinity`), strings with Python's escapes
//! (`\n`, `\"`, `\u001b`; everything from U+0020 up, non-ASCII too, as is).
//!
//! Sealing here rather than in Python matters because the ledger's writer
//! runs beside the event loop: the per-row JSON and HMAC held the GIL for
//! about a millisecond per batch at 1,000 requests a second, and every
//! request that arrived then waited for it.

use std::io::Write;

use ring::hmac;

/// One column's value, as the ledger stores it (a string borrowed: the
/// caller's own, written as it is read).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
}

/// A row's seal: 32 bytes.
pub type Seal = [u8; 32];

/// The canonical JSON of `[row_id, *values]`: this, then [`push_value`]
/// for each value and [`end_row`].
pub fn begin_row(row_id: i64, out: &mut Vec<u8>) {
    out.push(b'[');
    push_int(row_id, out);
}

/// One more value of the row [`begin_row`] started.
pub fn push_value(value: Value<'_>, out: &mut Vec<u8>) {
    out.push(b',');
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(n) => push_int(n, out),
        Value::Float(x) => push_float(x, out),
        Value::Str(s) => push_str(s, out),
    }
}

/// The end of the row [`begin_row`] started.
pub fn end_row(out: &mut Vec<u8>) {
    out.push(b']');
}

/// The seals of consecutive rows given in canonical form, laid end to end
/// in `encoded` (row `i` ends at `ends[i]`), the first chained to `prev`,
/// each next one to the one before.
pub fn seal_encoded(key: &hmac::Key, prev: &[u8], encoded: &[u8], ends: &[usize]) -> Vec<Seal> {
    let mut seals: Vec<Seal> = Vec::with_capacity(ends.len());
    let mut start = 0;
    for &end in ends {
        let before = seals.last().map_or(prev, |last| &last[..]);
        let sealed = seal_canonical(key, before, &encoded[start..end]);
        seals.push(sealed);
        start = end;
    }
    seals
}

/// The seal of one row, given in canonical form, chained to `prev`.
pub fn seal_canonical(key: &hmac::Key, prev: &[u8], canonical: &[u8]) -> Seal {
    let mut context = hmac::Context::with_key(key);
    context.update(prev);
    context.update(canonical);
    let mut out = [0u8; 32];
    out.copy_from_slice(context.sign().as_ref());
    out
}

/// An HMAC-SHA256 key.
pub fn key(bytes: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, bytes)
}

fn push_int(n: i64, out: &mut Vec<u8>) {
    let _ = write!(out, "{n}"); // a Vec takes every byte
}

/// A float's `{:e}` form, written without a heap allocation (this runs
/// for three columns of every ledger row).
struct Scientific {
    bytes: [u8; 32],
    len: usize,
}

impl std::fmt::Write for Scientific {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let room = self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Python's `float.__repr__`: the shortest digits that read back as the
/// same float, fixed-point when the decimal exponent is in [-4, 16), else
/// `d.ddde±XX` (at least two exponent digits); a whole number keeps `.0`.
/// `json.dumps` writes the non-finite ones as JavaScript names them.
fn push_float(x: f64, out: &mut Vec<u8>) {
    if x.is_nan() {
        out.extend_from_slice(b"NaN");
        return;
    }
    if x.is_infinite() {
        out.extend_from_slice(if x > 0.0 { b"Infinity" } else { b"-Infinity" });
        return;
    }
    // Rust's `{:e}` gives the same shortest round-trip digits, as
    // `[-]d[.ddd]e<exp>` (at most 24 bytes); only the layout differs.
    let mut scientific = Scientific {
        bytes: [0; 32],
        len: 0,
    };
    std::fmt::Write::write_fmt(&mut scientific, format_args!("{x:e}"))
        .expect("a float's `{:e}` fits 32 bytes");
    let text = std::str::from_utf8(&scientific.bytes[..scientific.len]).expect("ASCII");
    let (mantissa, exponent) = text
        .split_once('e')
        .expect("`{:e}` always writes an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` writes a decimal exponent");
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa),
    };
    let mut digit_bytes = [0u8; 24];
    let mut count = 0;
    for &byte in mantissa.as_bytes().iter().filter(|b| **b != b'.') {
        digit_bytes[count] = byte;
        count += 1;
    }
    let digits = &digit_bytes[..count];
    if negative {
        out.push(b'-');
    }
    // Python's decpt: where the decimal point falls in `digits`.
    let decpt = exponent + 1;
    if (-3..=16).contains(&decpt) {
        let count = count as i32;
        if decpt <= 0 {
            out.extend_from_slice(b"0.");
            out.extend(std::iter::repeat_n(b'0', (-decpt) as usize));
            out.extend_from_slice(digits);
        } else if decpt >= count {
            out.extend_from_slice(digits);
            out.extend(std::iter::repeat_n(b'0', (decpt - count) as usize));
            out.extend_from_slice(b".0");
        } else {
            out.extend_from_slice(&digits[..decpt as usize]);
            out.push(b'.');
            out.extend_from_slice(&digits[decpt as usize..]);
        }
    } else {
        out.extend_from_slice(&digits[..1]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        let sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(out, "e{sign}{:02}", exponent.unsigned_abs());
    }
}

/// A JSON string as `json.dumps(..., ensure_ascii=False)` writes it.
fn push_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let mut start = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escape: Option<&[u8]> = match byte {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            0..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&s.as_bytes()[start..i]);
        match escape {
            Some(escaped) => out.extend_from_slice(escaped),
            None => {
                let _ = write!(out, "\\u{byte:04x}");
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&s.as_bytes()[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canonical(row_id: i64, values: &[Value<'_>], out: &mut Vec<u8>) {
        begin_row(row_id, out);
        for value in values {
            push_value(*value, out);
        }
        end_row(out);
    }

    fn seal(key: &hmac::Key, prev: &[u8], row_id: i64, values: &[Value<'_>]) -> Seal {
        let mut encoded = Vec::new();
        canonical(row_id, values, &mut encoded);
        seal_canonical(key, prev, &encoded)
    }

    fn json(row_id: i64, values: &[Value]) -> String {
        let mut out = Vec::new();
        canonical(row_id, values, &mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    fn float(x: f64) -> String {
        let mut out = Vec::new();
        push_float(x, &mut out);
        String::from_utf8(out).expect("ASCII")
    }

    #[test]
    fn floats_are_written_as_python_writes_them() {
        // Each pair is (value, repr(value)) as CPython 3.11 prints it.
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (100.0, "100.0"),
            (1.5, "1.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (0.000123, "0.000123"),
            (1.23e-5, "1.23e-05"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (9999999999999998.0, "9999999999999998.0"),
            (1e100, "1e+100"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (1_700_000_000.123_456_7, "1700000000.1234567"),
            (-2.5e-7, "-2.5e-07"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (f64::NAN, "NaN"),
        ];
        for (value, python) in cases {
            assert_eq!(float(*value), *python, "{value:e}");
        }
    }

    #[test]
    fn strings_are_escaped_as_python_escapes_them() {
        let row = [
            Value::Str("a\"b\\c\n\r\t\u{8}\u{c}\u{1b}\u{0}\u{1f} é€😀\u{7f}"),
            Value::Null,
            Value::Bool(true),
            Value::Int(-42),
            Value::Float(0.25),
        ];
        assert_eq!(
            json(7, &row),
            "[7,\"a\\\"b\\\\c\\n\\r\\t\\b\\f\\u001b\\u0000\\u001f é€😀\u{7f}\",null,true,-42,0.25]"
        );
    }

    #[test]
    fn a_chain_links_each_row_to_the_one_before() {
        let key = key(b"k");
        let rows = [vec![Value::Int(1)], vec![Value::Str("x")]];
        let mut encoded = Vec::new();
        let mut ends = Vec::new();
        for (offset, row) in rows.iter().enumerate() {
            canonical(5 + offset as i64, row, &mut encoded);
            ends.push(encoded.len());
        }
        let seals = seal_encoded(&key, &[0; 32], &encoded, &ends);
        assert_eq!(seals[0], seal(&key, &[0; 32], 5, &rows[0]));
        assert_eq!(seals[1], seal(&key, &seals[0], 6, &rows[1]));
        // The same row sealed after another row, or under another id, differs.
        assert_ne!(seals[1], seal(&key, &[0; 32], 6, &rows[1]));
        assert_ne!(seals[0], seal(&key, &[0; 32], 6, &rows[0]));
    }

    proptest! {
        #[test]
        fn every_float_reads_back_as_itself(bits in any::<u64>()) {
            let x = f64::from_bits(bits);
            prop_assume!(x.is_finite());
            let text = float(x);
            let back: f64 = text.parse().expect("a float literal");
            prop_assert_eq!(back.to_bits(), x.to_bits(), "{}", text);
            // A whole number in fixed notation keeps its `.0`, as Python's does.
            prop_assert!(text.contains('.') || text.contains('e'), "{}", text);
        }
    }
}
