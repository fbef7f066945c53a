//! The prompt tokenizer on a small Unigram tokenizer built in code (the umT5 tokenizer is a
//! SentencePiece Unigram model with a Metaspace pre-tokenizer).

use std::path::PathBuf;

use tokenizers::models::unigram::Unigram;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::Tokenizer;
use turbo_core::Error;
use turbo_models::tokenizer::{PromptTokenizer, MAX_PROMPT_TOKENS};

const VOCAB: [&str; 8] = ["<pad>", "</s>", "<unk>", "▁a", "▁cat", "▁on", "▁mat", "▁&"];

fn tiny_tokenizer(vocab: &[&str]) -> Tokenizer {
    let scored = vocab
        .iter()
        .enumerate()
        .map(|(i, token)| (token.to_string(), -(i as f64)))
        .collect();
    let model = Unigram::from(scored, Some(2), false).unwrap();
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    tokenizer
}

fn id(token: &str) -> u32 {
    VOCAB.iter().position(|t| *t == token).unwrap() as u32
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turbo-models-tok-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn prompts_are_cleaned_tokenized_and_end_with_eos() {
    let tokenizer = PromptTokenizer::new(tiny_tokenizer(&VOCAB)).unwrap();
    assert_eq!(tokenizer.max_tokens(), MAX_PROMPT_TOKENS);
    let prompt = tokenizer.encode("  a cat\n\ton a &amp;amp; mat ").unwrap();
    let expected: Vec<u32> = ["▁a", "▁cat", "▁on", "▁a", "▁&", "▁mat", "</s>"]
        .iter()
        .map(|t| id(t))
        .collect();
    assert_eq!(prompt.ids, expected);
    assert!(!prompt.truncated);
    assert_eq!(tokenizer.eos_id(), id("</s>"));
}

#[test]
fn long_prompts_are_cut_to_the_limit_with_eos_kept() {
    let tokenizer = PromptTokenizer::new(tiny_tokenizer(&VOCAB))
        .unwrap()
        .with_max_tokens(4);
    let prompt = tokenizer.encode("a cat on a mat").unwrap();
    assert_eq!(
        prompt.ids,
        vec![id("▁a"), id("▁cat"), id("▁on"), id("</s>")]
    );
    assert!(prompt.truncated);
    let fits = tokenizer.encode("a cat on").unwrap();
    assert_eq!(fits.ids.len(), 4);
    assert!(!fits.truncated);
}

#[test]
fn empty_prompts_are_errors() {
    let tokenizer = PromptTokenizer::new(tiny_tokenizer(&VOCAB)).unwrap();
    for prompt in ["", "   ", "\n\t", "&nbsp;"] {
        assert!(
            matches!(tokenizer.encode(prompt), Err(Error::EmptyPrompt)),
            "{prompt:?}"
        );
    }
}

#[test]
fn tokenizer_files_load_and_bad_ones_are_typed_errors() {
    let dir = scratch_dir("files");
    let file = dir.join("tokenizer.json");
    tiny_tokenizer(&VOCAB).save(&file, false).unwrap();
    let from_file = PromptTokenizer::from_file(&file).unwrap();
    let in_memory = PromptTokenizer::new(tiny_tokenizer(&VOCAB)).unwrap();
    assert_eq!(
        from_file.encode("a mat").unwrap(),
        in_memory.encode("a mat").unwrap()
    );

    let missing = dir.join("nothing/tokenizer.json");
    match PromptTokenizer::from_file(&missing) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected an Io error, got {other:?}"),
    }
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "{ not json").unwrap();
    assert!(matches!(
        PromptTokenizer::from_file(&garbage),
        Err(Error::Tokenizer { .. })
    ));
    let no_eos = tiny_tokenizer(&["<pad>", "<unk2>", "<unk>", "▁a"]);
    assert!(matches!(
        PromptTokenizer::new(no_eos),
        Err(Error::Tokenizer { .. })
    ));
}
