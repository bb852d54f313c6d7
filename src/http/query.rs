//! Query strings, decoded strictly: a value that is not valid UTF-8 once decoded is
//! refused, never replaced, so that two different byte strings (`%FF`, `%FE`) cannot
//! become one identity.

use percent_encoding::percent_decode;

use super::{Error, Result};

/// The decoded `key=value` pairs, in order. `+` is a space, as in forms.
pub fn pairs(query: Option<&str>) -> Result<Vec<(String, String)>> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
            Ok((decode(key)?, decode(value)?))
        })
        .collect()
}

fn decode(raw: &str) -> Result<String> {
    let spaced = raw.replace('+', " ");
    percent_decode(spaced.as_bytes())
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| {
            Error::bad_request(
                "invalid_parameter",
                "query: keys and values must be valid UTF-8 once percent-decoded",
            )
        })
}

/// The query with the value of `token` hidden, for logs.
pub fn redacted(query: &str) -> String {
    query
        .split('&')
        .map(|piece| match piece.split_once('=') {
            Some((key, _)) if decode(key).is_ok_and(|k| k == "token") => "token=[redacted]",
            _ => piece,
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_decode_strictly() {
        let pairs = pairs(Some("userId=a%20b&x=1+2&flag&%E3%80%80=%E2%9C%93")).unwrap();
        assert_eq!(
            pairs,
            [
                ("userId".into(), "a b".into()),
                ("x".into(), "1 2".into()),
                ("flag".into(), String::new()),
                ("\u{3000}".into(), "\u{2713}".into()),
            ]
        );
        assert!(super::pairs(Some("userId=%FF")).is_err());
        assert!(super::pairs(Some("userId=%FE")).is_err());
        assert!(super::pairs(Some("%C3=x")).is_err());
    }

    #[test]
    fn tokens_stay_out_of_logs() {
        assert_eq!(
            redacted("userId=u&token=abc.def&x=1"),
            "userId=u&token=[redacted]&x=1"
        );
        assert_eq!(redacted("%74oken=abc"), "token=[redacted]");
    }

    proptest::proptest! {
        #[test]
        fn any_query_parses_or_is_refused_without_panicking(raw in "[ -~]{0,80}") {
            let _ = pairs(Some(&raw));
            let _ = redacted(&raw);
        }

        #[test]
        fn encoded_pairs_decode_to_exactly_what_was_encoded(
            pairs_in in proptest::collection::vec(("\\PC{1,12}", "\\PC{0,12}"), 0..6)
        ) {
            use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
            let raw = pairs_in
                .iter()
                .map(|(k, v)| format!(
                    "{}={}",
                    utf8_percent_encode(k, NON_ALPHANUMERIC),
                    utf8_percent_encode(v, NON_ALPHANUMERIC),
                ))
                .collect::<Vec<_>>()
                .join("&");
            proptest::prop_assert_eq!(pairs(Some(&raw)).unwrap(), pairs_in);
        }
    }
}
