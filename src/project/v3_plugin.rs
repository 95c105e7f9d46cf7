//! `nip migrate plugin-scaffold`: a v3 plugin (a source file with `init`, `process` and
//! `cleanup` functions) becomes a v4 plugin project — the one `nip init` makes for its
//! language — with the v3 functions' code copied in as comments where their logic goes:
//! `process` at the top of the message handler, `init` and `cleanup` where the SDK's
//! lifecycle hooks (`on_init`, `on_stop`) are declared. Nothing is translated: a human ports
//! the logic, and the project builds and passes its cases meanwhile.

use super::scaffold::{init, InitOptions};
use super::Language;
use anyhow::{anyhow, bail, Context as _};
use std::path::{Path, PathBuf};

/// The v3 functions, in the order they are looked for.
const V3_FUNCTIONS: [&str; 3] = ["init", "process", "cleanup"];

/// What plugin-scaffold made.
#[derive(Debug)]
pub struct Scaffolded {
    /// The project's directory.
    pub dir: PathBuf,
    /// The plugin source the v3 code went into.
    pub source: PathBuf,
    /// The v3 functions found (and placed).
    pub found: Vec<&'static str>,
    /// Those not found.
    pub missing: Vec<&'static str>,
}

/// Makes the project for the v3 plugin at `v3` (`language` and `name` default to the
/// file's extension and stem).
pub fn scaffold_from_v3(
    v3: &Path,
    language: Option<Language>,
    name: Option<String>,
    dir: Option<PathBuf>,
) -> anyhow::Result<Scaffolded> {
    let code =
        std::fs::read_to_string(v3).with_context(|| format!("cannot read {}", v3.display()))?;
    let language = match language {
        Some(language) => language,
        None => match v3.extension().and_then(|e| e.to_str()) {
            Some("rs") => Language::Rust,
            Some("ts" | "js") => Language::Typescript,
            Some("py") => Language::Python,
            Some("go") => Language::Go,
            _ => bail!(
                "{}: cannot tell the language from the extension: give --lang",
                v3.display()
            ),
        },
    };
    let name = match name {
        Some(name) => name,
        None => v3
            .file_stem()
            .and_then(|s| s.to_str())
            .map(|s| s.to_ascii_lowercase().replace('_', "-"))
            .ok_or_else(|| anyhow!("{}: no file name to call the plugin by", v3.display()))?,
    };
    let functions: Vec<(&'static str, Option<String>)> = V3_FUNCTIONS
        .iter()
        .map(|f| (*f, function_text(&code, f, language)))
        .collect();
    if functions.iter().all(|(_, text)| text.is_none()) {
        bail!(
            "{}: no init, process or cleanup function found (a v3 plugin defines them)",
            v3.display()
        );
    }
    let options = InitOptions {
        name,
        language,
        dir,
        port: 8080,
        admin_port: 9901,
        echo_port: 9100,
        plugin_port: 9200,
    };
    let dir = init(&options)?;
    let (file, handler_anchor, hooks_anchor, comment) = match language {
        Language::Rust => (
            "src/lib.rs",
            ".on_message(|mut message: Message, _ctx| async move {",
            ".on_message(",
            "//",
        ),
        Language::Typescript => (
            "assembly/index.ts",
            "function handle(message: Message, ctx: Context): Outcome {",
            "function handle(",
            "//",
        ),
        Language::Python => (
            "plugin.py",
            "async def handle(message, ctx):",
            "@plugin.on_message",
            "#",
        ),
        Language::Go => (
            "main.go",
            "func handle(ctx *nipplugin.Context, m *nipplugin.Message) (*nipplugin.Reply, error) {",
            "func handle(",
            "//",
        ),
    };
    let source = dir.join(file);
    let mut text = std::fs::read_to_string(&source)?;
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut hooks = String::new();
    for (function, body) in &functions {
        let Some(body) = body else {
            missing.push(*function);
            continue;
        };
        found.push(*function);
        if *function == "process" {
            let indent = indent_after(&text, handler_anchor);
            let block = commented(
                "TODO(migrate): v3 `process` did this with each message; port it here\n(the message is the handler's argument; return it, a reply or an error):",
                body,
                comment,
                &indent,
            );
            text = insert_after_line(&text, handler_anchor, &block)?;
        } else {
            let hook = if *function == "init" {
                "on_init"
            } else {
                "on_stop"
            };
            hooks.push_str(&commented(
                &format!(
                    "TODO(migrate): v3 `{function}` did this; port it to the SDK's {hook} hook:"
                ),
                body,
                comment,
                &indent_of(&text, hooks_anchor),
            ));
        }
    }
    if !hooks.is_empty() {
        text = insert_before_line(&text, hooks_anchor, &hooks)?;
    }
    std::fs::write(&source, text)?;
    Ok(Scaffolded {
        dir,
        source,
        found,
        missing,
    })
}

/// The text of function `name` in v3 plugin `code`: from its header to the end of its
/// body (braces matched, or Python's indentation).
fn function_text(code: &str, name: &str, language: Language) -> Option<String> {
    let lines: Vec<&str> = code.lines().collect();
    let header = |line: &str| {
        let trimmed = line.trim_start();
        let words = [
            "fn",
            "function",
            "func",
            "def",
            "async function",
            "async def",
            "export function",
            "pub fn",
        ];
        words.iter().any(|w| {
            trimmed
                .strip_prefix(w)
                .and_then(|rest| rest.strip_prefix(' '))
                .is_some_and(|rest| rest.trim_start().starts_with(&format!("{name}(")))
        })
    };
    let start = lines.iter().position(|l| header(l))?;
    if language == Language::Python {
        let indent = lines[start].len() - lines[start].trim_start().len();
        let mut end = start + 1;
        while end < lines.len() {
            let line = lines[end];
            let this = line.len() - line.trim_start().len();
            if !line.trim().is_empty() && this <= indent {
                break;
            }
            end += 1;
        }
        return Some(lines[start..end].join("\n").trim_end().to_string());
    }
    let mut depth = 0i32;
    let mut opened = false;
    for (offset, line) in lines[start..].iter().enumerate() {
        for c in line.chars() {
            match c {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        if opened && depth <= 0 {
            return Some(lines[start..=start + offset].join("\n"));
        }
    }
    None
}

/// A comment block: the note, then the code, each line behind `comment`.
fn commented(note: &str, code: &str, comment: &str, indent: &str) -> String {
    let mut out = String::new();
    for line in note.lines() {
        out.push_str(&format!("{indent}{comment} {line}\n"));
    }
    for line in code.lines() {
        out.push_str(&format!("{indent}{comment}   {line}\n"));
    }
    out
}

fn indent_of(text: &str, anchor: &str) -> String {
    text.lines()
        .find(|l| l.contains(anchor))
        .map(|l| l[..l.len() - l.trim_start().len()].to_string())
        .unwrap_or_default()
}

/// The indentation of the line after the one holding `anchor` (the body's).
fn indent_after(text: &str, anchor: &str) -> String {
    let mut lines = text.lines().skip_while(|l| !l.contains(anchor));
    lines.next();
    lines
        .next()
        .map(|l| l[..l.len() - l.trim_start().len()].to_string())
        .unwrap_or_default()
}

fn insert_after_line(text: &str, anchor: &str, block: &str) -> anyhow::Result<String> {
    let at = text
        .find(anchor)
        .ok_or_else(|| anyhow!("the template has no {anchor:?}"))?;
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i + 1);
    Ok(format!("{}{block}{}", &text[..end], &text[end..]))
}

fn insert_before_line(text: &str, anchor: &str, block: &str) -> anyhow::Result<String> {
    let at = text
        .find(anchor)
        .ok_or_else(|| anyhow!("the template has no {anchor:?}"))?;
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    Ok(format!("{}{block}{}", &text[..start], &text[start..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3_RUST: &str = "use v3::Message;\n\npub fn init(config: &Config) {\n    load(config);\n}\n\npub fn process(msg: Message) -> Message {\n    if msg.data.is_empty() {\n        return msg;\n    }\n    transform(msg)\n}\n\npub fn cleanup() {}\n";

    #[test]
    fn v3_functions_are_found_whole() {
        assert_eq!(
            function_text(V3_RUST, "process", Language::Rust).unwrap(),
            "pub fn process(msg: Message) -> Message {\n    if msg.data.is_empty() {\n        return msg;\n    }\n    transform(msg)\n}"
        );
        assert_eq!(
            function_text(V3_RUST, "cleanup", Language::Rust).unwrap(),
            "pub fn cleanup() {}"
        );
        let python = "def init(config):\n    pass\n\ndef process(message):\n    if message:\n        return message\n\n    return None\n\nx = 1\n";
        assert_eq!(
            function_text(python, "process", Language::Python).unwrap(),
            "def process(message):\n    if message:\n        return message\n\n    return None"
        );
        assert!(function_text(python, "cleanup", Language::Python).is_none());
    }
}
