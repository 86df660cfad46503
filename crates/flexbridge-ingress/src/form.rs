//! Strict `application/x-www-form-urlencoded` decoding. Lenient decoders replace bad bytes
//! and keep broken escapes, which would verify a signature over something other than what
//! Twilio sent; here a broken escape or invalid UTF-8 is an error (400).

/// Why a form body or query string does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-encoding at byte {at}")]
    MalformedEncoding {
        /// Byte offset of the `%`.
        at: usize,
    },
    /// A decoded name or value is not UTF-8.
    #[error("a decoded parameter is not valid UTF-8")]
    InvalidUtf8,
}

/// Decodes `name=value&...` into pairs in arrival order; repeated names are kept, `+` is a
/// space, an empty segment is skipped and a segment without `=` has an empty value.
pub fn parse(input: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    // One validation for the whole input: every slice cut at an ASCII `&` or `=` of valid
    // UTF-8 is valid UTF-8, so the segments need no second look.
    let text = std::str::from_utf8(input).map_err(|_| FormError::InvalidUtf8)?;
    let mut pairs = Vec::with_capacity(16);
    let mut start = 0;
    while start <= text.len() {
        // memchr, not `str::split`: the char searcher costs more per segment than it saves.
        let end = memchr::memchr(b'&', &text.as_bytes()[start..]).map_or(text.len(), |i| start + i);
        let segment = &text[start..end];
        let segment_start = start;
        start = end + 1;
        if segment.is_empty() {
            continue;
        }
        let (name, value, value_at) = match memchr::memchr(b'=', segment.as_bytes()) {
            Some(eq) => (&segment[..eq], &segment[eq + 1..], segment_start + eq + 1),
            None => (segment, "", segment_start + segment.len()),
        };
        pairs.push((decode(name, segment_start)?, decode(value, value_at)?));
    }
    Ok(pairs)
}

fn decode(raw: &str, at: usize) -> Result<String, FormError> {
    let raw_bytes = raw.as_bytes();
    let Some(first) = memchr::memchr2(b'%', b'+', raw_bytes) else {
        return Ok(raw.to_owned());
    };
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&raw_bytes[..first]);
    let mut i = first;
    while i < raw_bytes.len() {
        match raw_bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = raw_bytes.get(i + 1).and_then(|&b| hex(b));
                let lo = raw_bytes.get(i + 2).and_then(|&b| hex(b));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(FormError::MalformedEncoding { at: at + i }),
                }
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    // Escapes can spell bytes that are not UTF-8 even in valid input (`%FF`).
    String::from_utf8(out).map_err(|_| FormError::InvalidUtf8)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Encodes pairs as a form body (used by `simulate` and tests).
pub fn encode(pairs: &[(String, String)]) -> String {
    let mut out = String::with_capacity(pairs.len() * 48);
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(name, &mut out);
        out.push('=');
        encode_into(value, &mut out);
    }
    out
}

fn encode_into(text: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'*');
    if text.bytes().all(unreserved) {
        out.push_str(text);
        return;
    }
    for &b in text.as_bytes() {
        if unreserved(b) {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn decodes_and_keeps_repeats_in_order() {
        assert_eq!(
            parse(b"A=1&B=hello+world&A=%2B%41&&C&D=").unwrap(),
            pairs(&[
                ("A", "1"),
                ("B", "hello world"),
                ("A", "+A"),
                ("C", ""),
                ("D", "")
            ])
        );
    }

    #[test]
    fn rejects_broken_escapes_and_bad_utf8() {
        assert_eq!(
            parse(b"A=1&B=%G1"),
            Err(FormError::MalformedEncoding { at: 6 })
        );
        assert_eq!(parse(b"A=%4"), Err(FormError::MalformedEncoding { at: 2 }));
        assert_eq!(parse(b"A=%FF%FE"), Err(FormError::InvalidUtf8));
        assert_eq!(parse(b"A=\xff"), Err(FormError::InvalidUtf8));
        // Invalid bytes anywhere, a name or an otherwise empty-looking segment included.
        assert_eq!(parse(b"\xc3=1"), Err(FormError::InvalidUtf8));
        assert_eq!(parse(b"A=1&\xff"), Err(FormError::InvalidUtf8));
        // A malformed escape after a multi-byte character reports the byte offset.
        assert_eq!(
            parse("A=é%G".as_bytes()),
            Err(FormError::MalformedEncoding { at: 4 })
        );
    }

    #[test]
    fn encode_round_trips() {
        let p = pairs(&[
            ("Message", "Hello & goodbye! @#$%^*()"),
            ("Special", "ñáé +"),
        ]);
        assert_eq!(parse(encode(&p).as_bytes()).unwrap(), p);
    }
}
