//! What a rewrite or redirect may write into a path. The v4 validation and the proxy's
//! compiler (for xDS from any server) refuse the same texts through these checks, so a
//! rewrite that passes can only produce a valid request target.

/// Why `text`, written into a path by a rewrite, could not be part of one: a character
/// outside RFC 3986's path characters (`?` and `#` included; a rewrite changes the path
/// only).
pub fn path_text_problem(text: &str) -> Option<String> {
    text.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~%!$&'()*+,;=:@/".contains(*c)))
        .map(|c| format!("{c:?} cannot appear in a path"))
}

/// Why a `path_redirect` (a path, then optionally `?` and a query) is not one.
pub fn redirect_path_problem(target: &str) -> Option<String> {
    if !target.starts_with('/') {
        return Some("must start with '/'".into());
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    // `?` is a query character too.
    path_text_problem(path).or_else(|| path_text_problem(&query.replace('?', "")))
}

/// Why a `regex_rewrite` substitution (Envoy's: `\N` inserts group N) would write what no
/// path holds. The groups hold parts of a valid path; the text around them must be path
/// characters, and a backslash not before a digit is a literal backslash.
pub fn substitution_problem(substitution: &str) -> Option<String> {
    let mut added = substitution.to_string();
    while let Some(at) = added.find('\\') {
        let digits = added[at + 1..]
            .chars()
            .take_while(char::is_ascii_digit)
            .count();
        if digits == 0 {
            return Some("'\\\\' cannot appear in a path".into());
        }
        added.replace_range(at..at + 1 + digits, "");
    }
    path_text_problem(&added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_may_write_path_characters_only() {
        assert_eq!(path_text_problem("/v2/a-b_c.d~e%20;x=1:@!$&'()*+,"), None);
        for bad in ["/a b", "/a?b", "/a#b", "/é", "/a\"b", "/a\\b"] {
            assert!(path_text_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(redirect_path_problem("/landing?from=old?x"), None);
        assert!(redirect_path_problem("landing").is_some());
        assert!(redirect_path_problem("/a b?q").is_some());
        assert_eq!(substitution_problem("/users/\\1/items/\\12"), None);
        assert!(substitution_problem("/x\\\\y").is_some());
        assert!(substitution_problem("/\\1 \\2").is_some());
    }
}
