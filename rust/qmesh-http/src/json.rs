//! The nesting depth of a JSON document, measured before it is parsed.

/// The deepest nesting of arrays and objects in `data`, in one pass and
/// without recursion: brackets inside strings do not count, and a string
/// left open runs to the end. Unbalanced input gives some number; the parser
/// that follows rejects it.
pub fn nesting_depth(data: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in data {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::nesting_depth;

    #[test]
    fn strings_do_not_nest() {
        assert_eq!(nesting_depth(br#"{"a": [1, {"b": "[[[\"{{"}]}"#), 3);
        assert_eq!(nesting_depth(b"[[[]]]"), 3);
        assert_eq!(nesting_depth(br#""[[[" ["#), 1);
        assert_eq!(nesting_depth(br#"["unterminated [[[["#), 1);
        assert_eq!(nesting_depth(b"]]]["), 1);
        assert_eq!(nesting_depth(b""), 0);
    }
}
