//! What the Gate's fast path reads of an OpenAI-style request body, and the
//! body it sends upstream in its place.
//!
//! The fast path answers a request without Python only when Python would
//! have decided it the same way as one it already decided, so this reader
//! is strict: any body Python might judge differently (not an object, a
//! `stream` that is not a boolean, a `max_tokens` that is not a positive
//! integer, too deep, a number Python reads and Rust does not) is not read,
//! and goes to Python.

use serde_json::{Map, Value};

use crate::json::nesting_depth;

/// `max_tokens` when the request names none (Python's `DEFAULT_MAX_TOKENS`).
pub const DEFAULT_MAX_TOKENS: u64 = 512;
/// The largest `max_tokens` Python accepts (its `MAX_TOKEN_COUNT`).
pub const MAX_TOKEN_COUNT: u64 = 100_000_000;

/// A completion request's body, read.
#[derive(Debug)]
pub struct CompletionRequest {
    fields: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// `max_tokens`, else `max_completion_tokens`, else the default.
    pub max_tokens: u64,
}

/// The body read, or None when Python should read it (see the module).
pub fn read_completion_request(body: &[u8], max_depth: usize) -> Option<CompletionRequest> {
    if nesting_depth(body) > max_depth {
        return None;
    }
    let Value::Object(fields) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    let model = match fields.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        _ => return None,
    };
    let stream = match fields.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return None,
    };
    let count = |name: &str| -> Option<Option<u64>> {
        match fields.get(name) {
            None | Some(Value::Null) => Some(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(n) if (1..=MAX_TOKEN_COUNT).contains(&n) => Some(Some(n)),
                _ => None,
            },
            Some(_) => None,
        }
    };
    let max_tokens = count("max_tokens")?
        .or(count("max_completion_tokens")?)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    Some(CompletionRequest {
        fields,
        model,
        stream,
        max_tokens,
    })
}

impl CompletionRequest {
    /// The body for the upstream, which calls the model `upstream_model`:
    /// `raw` itself when nothing changes; else renamed, and a stream asks
    /// for usage in its last event (the ledger needs the real counts).
    /// None when `stream_options` is not an object (Python reads it).
    pub fn upstream_body(&self, raw: &[u8], upstream_model: &str) -> Option<Vec<u8>> {
        if self.model == upstream_model && !self.stream {
            return Some(raw.to_vec());
        }
        let mut fields = self.fields.clone();
        fields.insert("model".into(), Value::String(upstream_model.into()));
        if self.stream {
            fields.insert("stream".into(), Value::Bool(true));
            let mut options = match fields.remove("stream_options") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(options)) => options,
                Some(_) => return None,
            };
            options.insert("include_usage".into(), Value::Bool(true));
            fields.insert("stream_options".into(), Value::Object(options));
        }
        serde_json::to_vec(&Value::Object(fields)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a client sends, reading it never panics, and a body it
        /// reads gives an upstream body that reads back the same.
        #[test]
        fn any_body_is_read_or_left_alone(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Some(read) = read_completion_request(&body, 32) {
                let upstream = read.upstream_body(&body, "other");
                if let Some(upstream) = upstream {
                    let again = read_completion_request(&upstream, 32).expect("readable");
                    prop_assert_eq!(again.model, "other");
                    prop_assert_eq!(again.stream, read.stream);
                }
            }
        }

        #[test]
        fn json_shaped_bodies_too(
            model in "[a-z]{1,8}",
            stream in proptest::option::of(any::<bool>()),
            max in proptest::option::of(0u64..200_000_000),
            text in "\\PC{0,40}",
        ) {
            let mut body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]});
            if let Some(stream) = stream { body["stream"] = stream.into(); }
            if let Some(max) = max { body["max_tokens"] = max.into(); }
            let raw = serde_json::to_vec(&body).unwrap();
            match read_completion_request(&raw, 32) {
                Some(read) => {
                    prop_assert_eq!(&read.model, &model);
                    prop_assert_eq!(read.stream, stream.unwrap_or(false));
                    prop_assert_eq!(read.max_tokens, max.unwrap_or(DEFAULT_MAX_TOKENS));
                }
                None => prop_assert!(max.is_some_and(|m| m == 0 || m > MAX_TOKEN_COUNT)),
            }
        }
    }

    #[test]
    fn reads_what_python_reads() {
        let r = read_completion_request(br#"{"model":"m","messages":[]}"#, 32).unwrap();
        assert_eq!(
            (r.model.as_str(), r.stream, r.max_tokens),
            ("m", false, 512)
        );
        let r = read_completion_request(
            br#"{"model":"m","stream":true,"max_tokens":null,"max_completion_tokens":7}"#,
            32,
        )
        .unwrap();
        assert_eq!((r.stream, r.max_tokens), (true, 7));
        let r = read_completion_request(br#"{"model":"m","max_tokens":9}"#, 32).unwrap();
        assert_eq!(r.max_tokens, 9);
    }

    #[test]
    fn leaves_to_python_what_it_might_judge_otherwise() {
        for body in [
            &br#"[1]"#[..],
            br#"{"model":1}"#,
            br#"{"model":""}"#,
            br#"{"messages":[]}"#,
            br#"{"model":"m","stream":"yes"}"#,
            br#"{"model":"m","max_tokens":0}"#,
            br#"{"model":"m","max_tokens":1.5}"#,
            br#"{"model":"m","max_tokens":-3}"#,
            br#"{"model":"m","max_tokens":100000001}"#,
            br#"{"model":"m","max_completion_tokens":"9"}"#,
            br#"{"model":"m","x":NaN}"#,
            br#"{"model":"m""#,
        ] {
            assert!(read_completion_request(body, 32).is_none(), "{body:?}");
        }
        let deep = format!(
            r#"{{"model":"m","x":{}{}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(read_completion_request(deep.as_bytes(), 32).is_none());
    }

    #[test]
    fn the_upstream_body_renames_and_asks_a_stream_for_usage() {
        let raw = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let r = read_completion_request(raw, 32).unwrap();
        assert_eq!(r.upstream_body(raw, "m").unwrap(), raw.to_vec());
        let renamed: Value = serde_json::from_slice(&r.upstream_body(raw, "up").unwrap()).unwrap();
        assert_eq!(renamed["model"], "up");
        assert_eq!(renamed["messages"][0]["content"], "hi");

        let raw = br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#;
        let r = read_completion_request(raw, 32).unwrap();
        let body: Value = serde_json::from_slice(&r.upstream_body(raw, "m").unwrap()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stream_options"]["x"], 1);
        let raw = br#"{"model":"m","stream":true,"stream_options":[1]}"#;
        let r = read_completion_request(raw, 32).unwrap();
        assert!(r.upstream_body(raw, "m").is_none());
    }
}
