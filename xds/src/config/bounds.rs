//! Limits a document must fit before the YAML parser sees it.
//!
//! libyaml's work grows with the square of a document's nesting depth (its simple-key
//! bookkeeping walks every open level), so 80 KB of `[[[[…` cost seconds of CPU. One
//! linear pass over the text, [`check_document_bounds`], refuses a document larger than
//! [`MAX_DOCUMENT_BYTES`] or nested deeper than [`MAX_NESTING_DEPTH`] before any parsing.
//!
//! The depth it measures is an upper bound of the parser's: flow brackets outside quoted
//! scalars and comments, plus the block levels implied by indentation and by compact
//! `- `/`? ` indicators. Block scalar (`|`, `>`) content is skipped.

/// The largest document accepted (a config with thousands of routes is well under 1 MiB).
pub const MAX_DOCUMENT_BYTES: usize = 8 * 1024 * 1024;
/// The deepest nesting accepted; NIP's own schema needs under 10, plugin configs get the rest.
pub const MAX_NESTING_DEPTH: usize = 64;

/// Why a document was refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// Bigger than [`MAX_DOCUMENT_BYTES`].
    #[error("the document is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Nested deeper than [`MAX_NESTING_DEPTH`].
    #[error("nesting deeper than {limit} levels at line {line}; the limit is {limit}")]
    TooDeep {
        /// The line where the limit was passed (1-based).
        line: usize,
        /// The limit.
        limit: usize,
    },
}

/// Checks size and nesting depth in one pass over the text.
pub fn check_document_bounds(text: &str) -> Result<(), BoundsError> {
    check_bounds(text, MAX_DOCUMENT_BYTES, MAX_NESTING_DEPTH)
}

/// [`check_document_bounds`] with explicit limits.
pub fn check_bounds(text: &str, max_bytes: usize, max_depth: usize) -> Result<(), BoundsError> {
    if text.len() > max_bytes {
        return Err(BoundsError::TooLarge {
            size: text.len(),
            limit: max_bytes,
        });
    }
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // While inside a block scalar: the indentation of the line that opened it.
    let mut block_scalar_parent: Option<usize> = None;
    let mut quote: Option<u8> = None;
    for (index, line) in text.split('\n').enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|b| **b == b' ').count();
        let rest = &bytes[indent..];
        let blank = rest.iter().all(|b| b.is_ascii_whitespace());
        if let Some(parent) = block_scalar_parent {
            if blank || indent > parent {
                continue;
            }
            block_scalar_parent = None;
        }
        if quote.is_none() && flow == 0 {
            if blank || rest.first() == Some(&b'#') {
                continue;
            }
            while indents.last().is_some_and(|top| *top >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut depth_here = indents.len() + flow;
        let mut previous = b' ';
        let mut at_token_start = true;
        let mut i = 0;
        while i < rest.len() {
            let byte = rest[i];
            match quote {
                Some(b'"') => {
                    if byte == b'\\' {
                        i += 2;
                        continue;
                    }
                    if byte == b'"' {
                        quote = None;
                    }
                }
                Some(_) => {
                    if byte == b'\'' {
                        if rest.get(i + 1) == Some(&b'\'') {
                            // `''` is a quote inside a single-quoted scalar.
                            i += 2;
                            continue;
                        }
                        quote = None;
                    }
                }
                None => match byte {
                    b'"' | b'\'' if at_token_start => quote = Some(byte),
                    b'#' if previous == b' ' || previous == b'\t' => break,
                    b'[' | b'{' => {
                        flow += 1;
                        depth_here = depth_here.max(indents.len() + flow);
                    }
                    b']' | b'}' => flow = flow.saturating_sub(1),
                    b'-' | b'?' | b':'
                        if flow == 0
                            && at_token_start
                            && rest.get(i + 1).is_none_or(|b| *b == b' ') =>
                    {
                        // A compact block indicator opens one more level.
                        depth_here += 1;
                    }
                    b'|' | b'>' if flow == 0 && at_token_start => {
                        block_scalar_parent = Some(indent);
                    }
                    _ => {}
                },
            }
            if depth_here > max_depth {
                return Err(BoundsError::TooDeep {
                    line: index + 1,
                    limit: max_depth,
                });
            }
            at_token_start = quote.is_none()
                && matches!(byte, b' ' | b'\t' | b'-' | b'?' | b':' | b',' | b'[' | b'{');
            previous = byte;
            i += 1;
        }
        if depth_here > max_depth {
            return Err(BoundsError::TooDeep {
                line: index + 1,
                limit: max_depth,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_configs_pass() {
        let yaml = "\
api_gateway:
  address: \":8080\"   # a comment with [[[[ brackets
services:
  a:
    endpoints:
      - address: 127.0.0.1:9100
        region: r1
routes:
  - match: { prefix: \"/a[\" }
    service: a
    note: 'it''s {{{{ fine'
plugins:
  p:
    config: |
      [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
    after: [1, [2, [3]]]
";
        assert_eq!(check_document_bounds(yaml), Ok(()));
    }

    #[test]
    fn deep_flow_nesting_is_refused_in_linear_time() {
        let deep = "[".repeat(40_000);
        assert_eq!(
            check_document_bounds(&deep),
            Err(BoundsError::TooDeep { line: 1, limit: 64 })
        );
        let mapping = format!("a: {}", "{b: ".repeat(100));
        assert!(matches!(
            check_document_bounds(&mapping),
            Err(BoundsError::TooDeep { .. })
        ));
        let shallow = format!("a: {}{}", "[".repeat(60), "]".repeat(60));
        assert_eq!(check_document_bounds(&shallow), Ok(()));
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let compact = format!("{}x", "- ".repeat(100));
        assert!(matches!(
            check_document_bounds(&compact),
            Err(BoundsError::TooDeep { .. })
        ));
        let indented: String = (0..100)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert!(matches!(
            check_document_bounds(&indented),
            Err(BoundsError::TooDeep { line: 65, .. })
        ));
        let sibling_keys: String = (0..1000).map(|i| format!("k{i}: v\n")).collect();
        assert_eq!(check_document_bounds(&sibling_keys), Ok(()));
    }

    #[test]
    fn brackets_in_quoted_scalars_do_not_count() {
        let quoted = format!("a: \"{}\"\nb: '{}'\n", "[".repeat(100), "{".repeat(100));
        assert_eq!(check_document_bounds(&quoted), Ok(()));
        // A quote inside a plain scalar does not open one.
        let sneaky = format!("a: it's {}", "[".repeat(100));
        assert!(check_document_bounds(&sneaky).is_err());
    }

    #[test]
    fn oversized_documents_are_refused() {
        assert_eq!(
            check_bounds("a: 1234567890", 10, 64),
            Err(BoundsError::TooLarge {
                size: 13,
                limit: 10
            })
        );
    }
}
