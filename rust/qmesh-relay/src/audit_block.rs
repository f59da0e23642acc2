//! The statement audit's stored form: records in compressed blocks.
//!
//! A row per statement costs SQLite about 2 µs and 230 bytes (its columns,
//! two indexes, the WAL), more than the Gate's engine spends relaying the
//! statement, and the audit writes one for every statement of every
//! application. So the writer stores a block per (app, alias) per batch:
//! the records laid end to end, zstd-compressed, one database row. Encoding
//! happens here, without Python and without the GIL.
//!
//! A record keeps everything a row kept: its end time, duration, rows,
//! outcome, client session, the statement's text (truncated) where the text
//! is kept, and the SHA-256 of the whole statement. The hash is left out
//! where the stored text is the whole statement: it is the text's own hash,
//! made again when the block is read.
//!
//! Body, before compression (integers and floats little-endian):
//!
//! ```text
//! version u8 = 1 | records u32 | strings u32 | strings × (len u32, UTF-8)
//! records × (ts f64 | duration_ms f64 | flags u8 | [rows i64] | outcome u32
//!            | [session u32] | [text len u32, UTF-8] | [sha256 32 bytes])
//! ```
//!
//! `outcome` and `session` index the string table. A reader trusts nothing
//! in a block: every length and index is checked, and the decompressed size
//! is bounded before anything is allocated.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use zstd::bulk::{Compressor, Decompressor};

use crate::audit::{hex_digits, Entry};

/// Records a block holds at most: its records' ids are the block's id
/// times this plus their place.
pub const MAX_BLOCK_RECORDS: usize = 1024;
/// A block is closed once its body reaches this size, whatever its count.
const CLOSE_BLOCK_BYTES: usize = 4 << 20;
/// The most a body may decompress to: a closed block plus its last record,
/// whose text is bounded by the audit's `max_statement_chars`.
const MAX_BODY_BYTES: usize = 256 << 20;
/// zstd's fastest level: statements are repetitive, and the writer's CPU
/// is the relay's.
const LEVEL: i32 = 1;
const VERSION: u8 = 1;

const ROWS: u8 = 1;
const TEXT: u8 = 2;
const HASH: u8 = 4;
const SESSION: u8 = 8;

/// One (app, alias)'s records of one batch, ready to store.
#[derive(Debug)]
pub struct Block {
    pub app: Arc<str>,
    pub alias: Arc<str>,
    /// The oldest and newest record's end time (Unix time).
    pub first_ts: f64,
    pub last_ts: f64,
    pub records: usize,
    /// The compressed body.
    pub body: Vec<u8>,
}

/// One record read back from a block.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub ts: f64,
    /// None where only the hash is kept.
    pub text: Option<String>,
    /// Hex SHA-256 of the whole statement.
    pub sha256: String,
    pub duration_ms: f64,
    pub rows: Option<i64>,
    pub outcome: String,
    pub session: Option<String>,
}

/// A stored block that cannot be read: damaged, or not one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockError(pub String);

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "damaged audit block: {}", self.0)
    }
}

impl std::error::Error for BlockError {}

/// `entries` (oldest first) as blocks, each (app, alias)'s records in their
/// order; texts kept are cut after `max_chars` characters.
pub fn encode_blocks(entries: Vec<Entry>, max_chars: usize) -> Vec<Block> {
    let mut open: Vec<BlockWriter> = Vec::new();
    let mut by_names: HashMap<(Arc<str>, Arc<str>), usize> = HashMap::new();
    let mut blocks = Vec::new();
    let mut compressor = Compressor::new(LEVEL).expect("zstd level 1 is valid");
    for entry in entries {
        let key = (entry.who.app.clone(), entry.who.alias.clone());
        let at = *by_names.entry(key).or_insert_with(|| {
            open.push(BlockWriter::new(&entry));
            open.len() - 1
        });
        let writer = &mut open[at];
        writer.push(&entry, max_chars);
        if writer.records == MAX_BLOCK_RECORDS || writer.body.len() >= CLOSE_BLOCK_BYTES {
            let full = std::mem::replace(writer, BlockWriter::new(&entry));
            blocks.push(full.finish(&mut compressor));
        }
    }
    blocks.extend(
        open.into_iter()
            .filter(|writer| writer.records > 0)
            .map(|writer| writer.finish(&mut compressor)),
    );
    blocks
}

/// One block being filled.
struct BlockWriter {
    app: Arc<str>,
    alias: Arc<str>,
    first_ts: f64,
    last_ts: f64,
    records: usize,
    body: Vec<u8>,
    strings: Vec<u8>,
    string_ids: HashMap<Arc<str>, u32>,
}

impl BlockWriter {
    fn new(entry: &Entry) -> BlockWriter {
        BlockWriter {
            app: entry.who.app.clone(),
            alias: entry.who.alias.clone(),
            first_ts: f64::INFINITY,
            last_ts: f64::NEG_INFINITY,
            records: 0,
            body: Vec::new(),
            strings: Vec::new(),
            string_ids: HashMap::new(),
        }
    }

    fn push(&mut self, entry: &Entry, max_chars: usize) {
        self.records += 1;
        self.first_ts = self.first_ts.min(entry.ts);
        self.last_ts = self.last_ts.max(entry.ts);
        let text = entry
            .who
            .keep_text
            .then(|| stored_text(&entry.statement, max_chars));
        let whole = matches!(text, Some((_, true)));
        let mut flags = 0;
        for (set, flag) in [
            (entry.rows.is_some(), ROWS),
            (text.is_some(), TEXT),
            (!whole, HASH),
            (entry.who.session.is_some(), SESSION),
        ] {
            if set {
                flags |= flag;
            }
        }
        let outcome = self.string_id(&entry.outcome);
        let session = entry.who.session.as_ref().map(|s| self.string_id(s));
        let body = &mut self.body;
        body.extend_from_slice(&entry.ts.to_le_bytes());
        body.extend_from_slice(&entry.duration_ms.to_le_bytes());
        body.push(flags);
        if let Some(rows) = entry.rows {
            body.extend_from_slice(&rows.to_le_bytes());
        }
        body.extend_from_slice(&outcome.to_le_bytes());
        if let Some(session) = session {
            body.extend_from_slice(&session.to_le_bytes());
        }
        if let Some((text, _)) = &text {
            put_bytes(body, text.as_bytes());
        }
        if !whole {
            body.extend_from_slice(sha256(&entry.statement).as_ref());
        }
    }

    fn string_id(&mut self, text: &str) -> u32 {
        if let Some(id) = self.string_ids.get(text) {
            return *id;
        }
        let id = len_u32(self.string_ids.len());
        put_bytes(&mut self.strings, text.as_bytes());
        self.string_ids.insert(text.into(), id);
        id
    }

    fn finish(self, compressor: &mut Compressor<'_>) -> Block {
        let mut raw = Vec::with_capacity(9 + self.strings.len() + self.body.len());
        raw.push(VERSION);
        raw.extend_from_slice(&len_u32(self.records).to_le_bytes());
        raw.extend_from_slice(&len_u32(self.string_ids.len()).to_le_bytes());
        raw.extend_from_slice(&self.strings);
        raw.extend_from_slice(&self.body);
        // The frame records its content size: the reader bounds its
        // allocation by it.
        let body = compressor
            .compress(&raw)
            .expect("zstd compresses any input into a growable buffer");
        Block {
            app: self.app,
            alias: self.alias,
            first_ts: self.first_ts,
            last_ts: self.last_ts,
            records: self.records,
            body,
        }
    }
}

/// The text stored for `statement`: UTF-8 (invalid bytes replaced), cut
/// after `max_chars` characters with a note of the whole length; and
/// whether it is the whole statement, byte for byte.
pub(crate) fn stored_text(statement: &[u8], max_chars: usize) -> (Cow<'_, str>, bool) {
    let text = String::from_utf8_lossy(statement);
    match text.char_indices().nth(max_chars) {
        None => {
            let whole = matches!(text, Cow::Borrowed(_));
            (text, whole)
        }
        Some((cut, _)) => (
            Cow::Owned(format!(
                "{}… [truncated: {} characters in all]",
                &text[..cut],
                text.chars().count()
            )),
            false,
        ),
    }
}

pub(crate) fn sha256(data: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, data)
}

fn hex(digest: &[u8]) -> String {
    hex_digits(digest).map(char::from).collect()
}

fn len_u32(len: usize) -> u32 {
    // Blocks close at 4 MiB and 1,024 records; a statement is bounded by
    // the audit queue's bytes (64 MiB by default), far below 4 GiB.
    u32::try_from(len).expect("an audit block's lengths fit in 32 bits")
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&len_u32(bytes.len()).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The records of a stored block, in the order they were recorded.
pub fn decode_block(body: &[u8]) -> Result<Vec<StoredRecord>, BlockError> {
    let raw = decompress(body)?;
    let mut cursor = Cursor { rest: &raw };
    let version = cursor.u8()?;
    if version != VERSION {
        return Err(BlockError(format!("unknown version {version}")));
    }
    let count = cursor.u32()? as usize;
    let string_count = cursor.u32()? as usize;
    // Every record and string takes bytes: counts beyond them are lies.
    if count > MAX_BLOCK_RECORDS || string_count > cursor.rest.len() / 4 {
        return Err(BlockError(format!(
            "{count} records and {string_count} strings in {} bytes",
            raw.len()
        )));
    }
    let strings = (0..string_count)
        .map(|_| cursor.text())
        .collect::<Result<Vec<_>, _>>()?;
    let string = |id: u32| {
        strings
            .get(id as usize)
            .cloned()
            .ok_or_else(|| BlockError(format!("string {id} of {}", strings.len())))
    };
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let ts = cursor.f64()?;
        let duration_ms = cursor.f64()?;
        let flags = cursor.u8()?;
        if flags & !(ROWS | TEXT | HASH | SESSION) != 0 || flags & (TEXT | HASH) == 0 {
            return Err(BlockError(format!("record flags {flags:#x}")));
        }
        let rows = (flags & ROWS != 0).then(|| cursor.i64()).transpose()?;
        let outcome = string(cursor.u32()?)?;
        let session = (flags & SESSION != 0)
            .then(|| cursor.u32().and_then(string))
            .transpose()?;
        let text = (flags & TEXT != 0).then(|| cursor.text()).transpose()?;
        let sha256 = match (flags & HASH != 0, &text) {
            (true, _) => hex(cursor.take(32)?),
            (false, Some(text)) => hex(sha256(text.as_bytes()).as_ref()),
            (false, None) => unreachable!("flags without text have the hash"),
        };
        records.push(StoredRecord {
            ts,
            text,
            sha256,
            duration_ms,
            rows,
            outcome,
            session,
        });
    }
    if !cursor.rest.is_empty() {
        return Err(BlockError(format!(
            "{} bytes after the last record",
            cursor.rest.len()
        )));
    }
    Ok(records)
}

/// Decompress a body within [`MAX_BODY_BYTES`], allocating no more than
/// its frame declares.
fn decompress(body: &[u8]) -> Result<Vec<u8>, BlockError> {
    let mut decompressor = Decompressor::new().map_err(|e| BlockError(format!("zstd: {e}")))?;
    qmesh_wire::decompress_within(&mut decompressor, body, MAX_BODY_BYTES).map_err(BlockError)
}

struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], BlockError> {
        if len > self.rest.len() {
            return Err(BlockError(format!(
                "{len} bytes wanted, {} left",
                self.rest.len()
            )));
        }
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BlockError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8, BlockError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, BlockError> {
        self.array().map(u32::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, BlockError> {
        self.array().map(i64::from_le_bytes)
    }

    fn f64(&mut self) -> Result<f64, BlockError> {
        self.array().map(f64::from_le_bytes)
    }

    fn text(&mut self) -> Result<String, BlockError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| BlockError("a text that is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Who;

    fn who(app: &str, session: Option<&str>, keep_text: bool) -> Arc<Who> {
        Arc::new(Who {
            app: app.into(),
            alias: "orders".into(),
            session: session.map(Into::into),
            keep_text,
        })
    }

    fn entry(who: &Arc<Who>, ts: f64, statement: &[u8], rows: Option<i64>) -> Entry {
        Entry {
            ts,
            who: who.clone(),
            statement: statement.into(),
            duration_ms: 1.5,
            rows,
            outcome: Cow::Borrowed("ok"),
        }
    }

    const SELECT_1_SHA256: &str =
        "e004ebd5b5532a4b85984a62f8ad48a81aa3460c1ca07701f386135d72cdecf5";

    #[test]
    fn records_come_back_as_recorded_a_block_per_app_and_alias() {
        let shop = who("shop", Some("edge-1/42"), true);
        let other_session = who("shop", None, true);
        let hashed = who("billing", Some("edge-2/7"), false);
        let mut failed = entry(&shop, 3.0, b"SELEC 1", None);
        failed.outcome = Cow::Owned("error 42601".into());
        let entries = vec![
            entry(&shop, 2.0, b"SELECT 1", Some(1)),
            entry(&hashed, 1.0, b"SELECT 1", Some(1)),
            entry(&other_session, 1.5, b"SELECT 1", Some(i64::MAX)),
            failed,
        ];
        let blocks = encode_blocks(entries, 100);
        assert_eq!(blocks.len(), 2);
        let (shop_block, billing) = (&blocks[0], &blocks[1]);
        assert_eq!((&*shop_block.app, &*shop_block.alias), ("shop", "orders"));
        assert_eq!(
            (shop_block.first_ts, shop_block.last_ts, shop_block.records),
            (1.5, 3.0, 3)
        );
        let records = decode_block(&shop_block.body).unwrap();
        let seen: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.ts,
                    r.text.as_deref(),
                    r.rows,
                    r.outcome.as_str(),
                    r.session.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (2.0, Some("SELECT 1"), Some(1), "ok", Some("edge-1/42")),
                (1.5, Some("SELECT 1"), Some(i64::MAX), "ok", None),
                (3.0, Some("SELEC 1"), None, "error 42601", Some("edge-1/42")),
            ]
        );
        assert_eq!(records[0].sha256, SELECT_1_SHA256);
        assert_eq!(records[0].duration_ms, 1.5);
        let billing = decode_block(&billing.body).unwrap();
        assert_eq!(billing[0].text, None);
        assert_eq!(billing[0].sha256, SELECT_1_SHA256, "kept where text is not");
    }

    #[test]
    fn a_cut_or_mended_text_keeps_the_hash_of_the_whole_statement() {
        let shop = who("shop", None, true);
        let long = "é".repeat(12);
        let entries = vec![
            entry(&shop, 1.0, long.as_bytes(), None),
            entry(&shop, 1.0, b"SELECT '\xff'", None),
        ];
        let records = decode_block(&encode_blocks(entries, 10)[0].body).unwrap();
        assert_eq!(
            records[0].text.as_deref(),
            Some("éééééééééé… [truncated: 12 characters in all]")
        );
        assert_eq!(records[0].sha256, hex(sha256(long.as_bytes()).as_ref()));
        assert_eq!(records[1].text.as_deref(), Some("SELECT '\u{fffd}'"));
        assert_eq!(records[1].sha256, hex(sha256(b"SELECT '\xff'").as_ref()));
    }

    #[test]
    fn a_full_block_is_closed_and_the_next_one_opened() {
        let shop = who("shop", None, true);
        let entries = (0..MAX_BLOCK_RECORDS + 1)
            .map(|i| entry(&shop, i as f64, format!("SELECT {i}").as_bytes(), None))
            .collect();
        let blocks = encode_blocks(entries, 100);
        let counts: Vec<_> = blocks.iter().map(|b| b.records).collect();
        assert_eq!(counts, [MAX_BLOCK_RECORDS, 1]);
        assert_eq!(blocks[1].first_ts, MAX_BLOCK_RECORDS as f64);
        let last = decode_block(&blocks[1].body).unwrap();
        assert_eq!(last[0].text.as_deref(), Some("SELECT 1024"));
    }

    #[test]
    fn pgbench_statements_take_a_few_bytes_each() {
        let shop = who("shop", Some("edge-1/42"), true);
        let entries = (0..1000)
            .map(|i| {
                let aid = (i * 7919) % 100_000;
                let text = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};");
                entry(&shop, 1e9 + i as f64 * 1e-4, text.as_bytes(), Some(1))
            })
            .collect();
        let block = &encode_blocks(entries, 8192)[0];
        assert!(block.body.len() < 20 * 1000, "{} bytes", block.body.len());
    }

    #[test]
    fn a_damaged_block_is_an_error_never_a_panic_or_a_huge_allocation() {
        let shop = who("shop", Some("edge-1/42"), true);
        let body = encode_blocks(vec![entry(&shop, 1.0, b"SELECT 1", Some(1))], 100)
            .remove(0)
            .body;
        let raw = decompress(&body).unwrap();
        assert!(decode_block(b"").is_err());
        assert!(decode_block(b"not zstd at all").is_err());
        // Every cut and every single-byte change of the raw body.
        let compress = |raw: &[u8]| zstd::bulk::compress(raw, 1).unwrap();
        for cut in 0..raw.len() {
            assert!(
                decode_block(&compress(&raw[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        for at in 0..raw.len() {
            for value in [0u8, 0x7f, 0xff] {
                let mut changed = raw.clone();
                changed[at] = value;
                // Some changes make another valid block (a timestamp's
                // byte); none may panic.
                let _ = decode_block(&compress(&changed));
            }
        }
        let mut trailing = raw.clone();
        trailing.push(0);
        assert!(decode_block(&compress(&trailing)).is_err());
        // A frame whose header claims more than a block may hold is refused
        // before anything is allocated for it: zstd's magic, a descriptor
        // for a single segment with an 8-byte size, and the size.
        let mut huge = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0];
        huge.extend_from_slice(&(MAX_BODY_BYTES as u64 + 1).to_le_bytes());
        let err = decode_block(&huge).unwrap_err();
        assert!(err.0.contains("bytes decompressed"), "{err}");
    }
}
