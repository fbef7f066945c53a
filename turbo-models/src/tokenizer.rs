//! The umT5 prompt tokenizer: upstream's text cleaning, then the `google/umt5-xxl`
//! `tokenizer.json` through the `tokenizers` crate, then `</s>`.
//!
//! Upstream (`wan/modules/tokenizers.py`, `clean='whitespace'`) cleans a prompt with
//! `ftfy.fix_text`, `html.unescape` twice, and whitespace collapsing. [`clean_prompt`] does what
//! can be done without Python's ftfy:
//! - HTML character references are unescaped twice: every numeric reference (`&#39;`, `&#x27;`)
//!   and the named ones prompts actually contain (`&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`,
//!   `&nbsp;`, with their semicolon). Python knows all 2 231 HTML5 names and also accepts a few
//!   without the semicolon, and maps numeric references 128–159 to their cp1252 characters;
//!   here other names are left as they are and those numbers give the C1 control characters.
//! - Runs of whitespace become one space and the ends are trimmed, as `re.sub(r'\s+', ' ')`
//!   does; whitespace is Rust's `char::is_whitespace` (Unicode `White_Space`), which unlike
//!   Python's `str.isspace` does not include the control separators U+001C–U+001F.
//! - ftfy's repairs are not done: mojibake (UTF-8 read as Latin-1 or cp1252, as in `cafÃ©`),
//!   curly quotes turned straight, terminal escapes and other "fixes". A prompt that is valid
//!   UTF-8 text, as Rust strings are, is usually left unchanged by ftfy anyway.
//!
//! Tokens are the tokenizer's ids of the cleaned text without special tokens, truncated to
//! `max_tokens − 1`, followed by `</s>` (T5's template `$A </s>`; `add_special_tokens=True`
//! and `truncation=True, max_length=512` upstream). Truncation is logged with `tracing::warn!`.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;
use turbo_core::{Error, Result};

/// The longest token sequence umT5 is given in Wan (`text_len`), `</s>` included.
pub const MAX_PROMPT_TOKENS: usize = 512;

/// The end-of-sequence token appended to every prompt.
pub const EOS_TOKEN: &str = "</s>";

/// The token ids of one prompt, ending with `</s>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Ids, `</s>` last; at most the tokenizer's `max_tokens`.
    pub ids: Vec<u32>,
    /// Whether the prompt was longer and its end was cut.
    pub truncated: bool,
}

/// The umT5 tokenizer with Wan's cleaning, `</s>` and length limit.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    eos_id: u32,
    max_tokens: usize,
    /// Where the tokenizer came from, for error messages.
    source: PathBuf,
}

impl PromptTokenizer {
    /// Loads a `tokenizer.json` (for Wan: `google/umt5-xxl/tokenizer.json` in the checkpoint
    /// folder).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "tokenizer file not found (for Wan: google/umt5-xxl/tokenizer.json)",
                ),
            });
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("not a tokenizer.json: {e}"),
        })?;
        Self::with_source(tokenizer, path.to_path_buf())
    }

    /// Wraps a tokenizer built in memory; its vocabulary must hold `</s>`.
    pub fn new(tokenizer: Tokenizer) -> Result<Self> {
        Self::with_source(tokenizer, PathBuf::from("<in memory>"))
    }

    fn with_source(tokenizer: Tokenizer, source: PathBuf) -> Result<Self> {
        let eos_id = tokenizer
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| Error::Tokenizer {
                path: source.clone(),
                reason: format!("the vocabulary has no `{EOS_TOKEN}` token"),
            })?;
        Ok(Self {
            tokenizer,
            eos_id,
            max_tokens: MAX_PROMPT_TOKENS,
            source,
        })
    }

    /// Sets the token limit (`</s>` included); at least 2, so that one text token fits.
    pub fn with_max_tokens(mut self, max_tokens: usize) -> Self {
        self.max_tokens = max_tokens.max(2);
        self
    }

    /// Writes the tokenizer as a `tokenizer.json` that [`PromptTokenizer::from_file`] reads.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.tokenizer
            .save(path, false)
            .map_err(|e| Error::Tokenizer {
                path: path.to_owned(),
                reason: format!("cannot write: {e}"),
            })
    }

    /// The id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The token limit, `</s>` included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Cleans and tokenizes `prompt`. An empty prompt (after cleaning) is an error
    /// ([`Error::EmptyPrompt`]); a prompt longer than the limit is cut, with a warning.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let text = clean_prompt(prompt);
        if text.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let encoding =
            self.tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| Error::Tokenizer {
                    path: self.source.clone(),
                    reason: format!("cannot encode the prompt: {e}"),
                })?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let room = self.max_tokens - 1;
        let truncated = ids.len() > room;
        if truncated {
            tracing::warn!(
                tokens = ids.len() + 1,
                limit = self.max_tokens,
                "the prompt is longer than the text encoder's limit; its end is cut"
            );
            ids.truncate(room);
        }
        ids.push(self.eos_id);
        Ok(TokenizedPrompt { ids, truncated })
    }
}

/// Upstream's `whitespace_clean(basic_clean(text))` without ftfy (see the module docs for what
/// differs): HTML references unescaped twice, whitespace runs collapsed to one space, the ends
/// trimmed.
pub fn clean_prompt(text: &str) -> String {
    let unescaped = html_unescape(&html_unescape(text));
    unescaped.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Named references recognised by [`html_unescape`].
const NAMED_REFERENCES: [(&str, char); 6] = [
    ("amp", '&'),
    ("lt", '<'),
    ("gt", '>'),
    ("quot", '"'),
    ("apos", '\''),
    ("nbsp", '\u{a0}'),
];

/// Replaces HTML character references (`&#NN;`, `&#xHH;` and the names of
/// [`NAMED_REFERENCES`]) by their characters; anything else is kept as written.
fn html_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        match parse_reference(rest) {
            Some((ch, length)) => {
                out.push(ch);
                rest = &rest[length..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The character of the reference at the start of `text` (which starts with `&`) and the
/// reference's length in bytes.
fn parse_reference(text: &str) -> Option<(char, usize)> {
    let end = text.find(';')?;
    let body = &text[1..end];
    let ch = if let Some(number) = body.strip_prefix('#') {
        let code = match number.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => number.parse::<u32>().ok()?,
        };
        // Python turns invalid code points (surrogates, beyond U+10FFFF, NUL) into U+FFFD.
        match code {
            0 => '\u{fffd}',
            code => char::from_u32(code).unwrap_or('\u{fffd}'),
        }
    } else {
        NAMED_REFERENCES
            .iter()
            .find(|(name, _)| *name == body)
            .map(|&(_, ch)| ch)?
    };
    Some((ch, end + 1))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn cleaning_unescapes_twice_and_collapses_whitespace() {
        assert_eq!(clean_prompt("  a\t\tcat \n on   a mat "), "a cat on a mat");
        assert_eq!(clean_prompt("Tom &amp; Jerry"), "Tom & Jerry");
        assert_eq!(clean_prompt("Tom &amp;amp; Jerry"), "Tom & Jerry");
        assert_eq!(clean_prompt("&lt;b&gt; &#39;x&#x27; &quot;"), "<b> 'x' \"");
        assert_eq!(clean_prompt("a&nbsp;b"), "a b");
        assert_eq!(
            clean_prompt("fish & chips &unknown; &#xZZ;"),
            "fish & chips &unknown; &#xZZ;"
        );
        assert_eq!(clean_prompt("&#55296;"), "\u{fffd}");
        assert_eq!(clean_prompt(" \u{3000} "), "");
    }

    proptest! {
        #[test]
        fn cleaned_text_is_trimmed_single_spaced_and_stable(text in "[a-z &;#\\t\\n]{0,40}") {
            let cleaned = clean_prompt(&text);
            prop_assert_eq!(cleaned.trim(), cleaned.as_str());
            prop_assert!(!cleaned.contains("  "));
            prop_assert!(!cleaned.contains(['\t', '\n']));
            // Without references, cleaning only touches whitespace.
            if !text.contains('&') {
                prop_assert_eq!(cleaned.split(' ').filter(|w| !w.is_empty()).count(),
                    text.split_whitespace().count());
            }
        }
    }
}
