//! The key names of the three LoRA layouts in circulation, mapped to the Wan checkpoint keys
//! (`spec/keys/*.tsv`):
//! - ComfyUI / Kijai: `diffusion_model.<key>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
//!   and full differences `<key>.diff` (weights) / `<key>.diff_b` (biases);
//! - PEFT: `diffusion_model.<key>.lora_A.weight` / `.lora_B.weight` (alpha folded into A);
//! - diffusers: `transformer.blocks.N.attn1.to_q.lora_A.weight` …, the diffusers module names
//!   of the Wan transformer;
//! - kohya / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.alpha`: the Wan
//!   keys with `_` for `.`.

/// Which part of an adapter a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// `[rank, in]`: `lora_down` / `lora_A`.
    Down,
    /// `[out, rank]`: `lora_up` / `lora_B`.
    Up,
    /// The scalar α of `α / rank` (ComfyUI files; PEFT and diffusers fold it into A).
    Alpha,
    /// A full difference of the weight (or of a plain tensor such as `modulation`).
    Diff,
    /// A full difference of the bias.
    DiffBias,
}

/// Tensor-name endings, longest first where one ends another.
const SUFFIXES: [(&str, Part); 7] = [
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".alpha", Part::Alpha),
    (".diff_b", Part::DiffBias),
    (".diff", Part::Diff),
];

/// Prefixes the tools put before the model's keys; `transformer.` marks the diffusers names.
const PREFIXES: [&str; 4] = [
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    DIFFUSERS_PREFIX,
];

pub(crate) const DIFFUSERS_PREFIX: &str = "transformer.";

/// The prefix of kohya / musubi-tuner names, whose module keys have `_` for `.`.
pub(crate) const KOHYA_PREFIX: &str = "lora_unet_";

/// The Wan modules inside `blocks.N.` an adapter can target, by checkpoint key.
const WAN_BLOCK_MODULES: [&str; 19] = [
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "self_attn.norm_q",
    "self_attn.norm_k",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "cross_attn.norm_q",
    "cross_attn.norm_k",
    "cross_attn.k_img",
    "cross_attn.v_img",
    "cross_attn.norm_k_img",
    "ffn.0",
    "ffn.2",
    "norm3",
    "modulation",
];

/// The Wan modules outside the blocks an adapter can target.
const WAN_TOP_MODULES: [&str; 7] = [
    "text_embedding.0",
    "text_embedding.2",
    "time_embedding.0",
    "time_embedding.2",
    "time_projection.1",
    "head.head",
    "head.modulation",
];

/// diffusers module names inside `blocks.N.` and their Wan names.
const DIFFUSERS_BLOCK_NAMES: [(&str, &str); 19] = [
    ("attn1.to_q", "self_attn.q"),
    ("attn1.to_k", "self_attn.k"),
    ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"),
    ("attn1.norm_q", "self_attn.norm_q"),
    ("attn1.norm_k", "self_attn.norm_k"),
    ("attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"),
    ("attn2.to_out.0", "cross_attn.o"),
    ("attn2.norm_q", "cross_attn.norm_q"),
    ("attn2.norm_k", "cross_attn.norm_k"),
    ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    // diffusers swapped the names of Wan's affine `norm3` and its plain `norm2`.
    ("norm2", "norm3"),
    ("scale_shift_table", "modulation"),
];

/// diffusers module names outside the blocks and their Wan names.
const DIFFUSERS_TOP_NAMES: [(&str, &str); 7] = [
    (
        "condition_embedder.text_embedder.linear_1",
        "text_embedding.0",
    ),
    (
        "condition_embedder.text_embedder.linear_2",
        "text_embedding.2",
    ),
    (
        "condition_embedder.time_embedder.linear_1",
        "time_embedding.0",
    ),
    (
        "condition_embedder.time_embedder.linear_2",
        "time_embedding.2",
    ),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
    ("scale_shift_table", "head.modulation"),
];

/// A tensor name of a LoRA file, split into the Wan module it targets and the part it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedKey {
    /// The Wan module key, as in the checkpoint without `.weight` (`blocks.0.self_attn.q`), or
    /// a plain tensor's key (`blocks.0.modulation`).
    pub(crate) module: String,
    pub(crate) part: Part,
    pub(crate) style: NameStyle,
}

/// How a file names the modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameStyle {
    /// The Wan checkpoint keys (ComfyUI, PEFT).
    Wan,
    /// The diffusers module names.
    Diffusers,
    /// The Wan keys with `_` for `.` (kohya, musubi-tuner).
    Kohya,
}

/// Parses one tensor name; `None` when no layout knows it.
pub(crate) fn parse_key(name: &str) -> Option<ParsedKey> {
    let (stem, part) = SUFFIXES
        .iter()
        .find_map(|&(suffix, part)| name.strip_suffix(suffix).map(|stem| (stem, part)))?;
    let prefix = PREFIXES.iter().find(|p| stem.starts_with(*p)).copied();
    let stem = prefix.map_or(stem, |p| &stem[p.len()..]);
    // Differences are named after the module (`norm3.diff_b`) or after the tensor itself
    // (`norm3.bias.diff_b`): both mean the same module.
    let stem = match part {
        Part::DiffBias => stem.strip_suffix(".bias").unwrap_or(stem),
        Part::Diff => stem.strip_suffix(".weight").unwrap_or(stem),
        _ => stem,
    };
    let layout = match prefix {
        Some(DIFFUSERS_PREFIX) => NameStyle::Diffusers,
        _ if stem.starts_with(KOHYA_PREFIX) => NameStyle::Kohya,
        _ => NameStyle::Wan,
    };
    let module = match layout {
        NameStyle::Diffusers => diffusers_to_wan(stem)?,
        NameStyle::Kohya => kohya_to_wan(&stem[KOHYA_PREFIX.len()..])?,
        NameStyle::Wan => stem.to_owned(),
    };
    Some(ParsedKey {
        module,
        part,
        style: layout,
    })
}

/// The Wan key of a diffusers module name (`blocks.3.attn2.to_out.0` → `blocks.3.cross_attn.o`).
pub(crate) fn diffusers_to_wan(module: &str) -> Option<String> {
    renamed(
        module,
        '.',
        |name| lookup(&DIFFUSERS_BLOCK_NAMES, name),
        |name| lookup(&DIFFUSERS_TOP_NAMES, name),
    )
}

/// The Wan key of a kohya module name (`blocks_3_cross_attn_o` → `blocks.3.cross_attn.o`).
pub(crate) fn kohya_to_wan(module: &str) -> Option<String> {
    renamed(
        module,
        '_',
        |name| with_underscores(&WAN_BLOCK_MODULES, name),
        |name| with_underscores(&WAN_TOP_MODULES, name),
    )
}

/// The Wan key of `blocks<sep>N<sep><name>` (`name` renamed by `block`) or of a top-level
/// `module` (renamed by `top`).
fn renamed(
    module: &str,
    separator: char,
    block: impl Fn(&str) -> Option<&'static str>,
    top: impl Fn(&str) -> Option<&'static str>,
) -> Option<String> {
    if let Some(rest) = module
        .strip_prefix("blocks")
        .and_then(|r| r.strip_prefix(separator))
    {
        let (index, name) = rest.split_once(separator)?;
        index.parse::<usize>().ok()?;
        return Some(format!("blocks.{index}.{}", block(name)?));
    }
    top(module).map(str::to_owned)
}

/// The key of `keys` that reads `name` with `_` for `.`.
fn with_underscores(keys: &[&'static str], name: &str) -> Option<&'static str> {
    keys.iter()
        .copied()
        .find(|key| key.replace('.', "_") == name)
}

/// The Wan name of `name` in `table`.
fn lookup(table: &[(&'static str, &'static str)], name: &str) -> Option<&'static str> {
    table
        .iter()
        .find(|(diffusers, _)| *diffusers == name)
        .map(|(_, wan)| *wan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(name: &str) -> (String, Part) {
        let key = parse_key(name).unwrap_or_else(|| panic!("`{name}` not parsed"));
        (key.module, key.part)
    }

    #[test]
    fn comfy_peft_and_diffusers_names_map_to_wan_keys() {
        let q = "blocks.0.self_attn.q".to_owned();
        for (name, part) in [
            (
                "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
                Part::Down,
            ),
            (
                "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
                Part::Up,
            ),
            ("diffusion_model.blocks.0.self_attn.q.alpha", Part::Alpha),
            (
                "diffusion_model.blocks.0.self_attn.q.lora_A.weight",
                Part::Down,
            ),
            (
                "model.diffusion_model.blocks.0.self_attn.q.lora_B.weight",
                Part::Up,
            ),
            ("transformer.blocks.0.attn1.to_q.lora_A.weight", Part::Down),
            ("blocks.0.self_attn.q.diff", Part::Diff),
            (
                "diffusion_model.blocks.0.self_attn.q.weight.diff",
                Part::Diff,
            ),
            (
                "diffusion_model.blocks.0.self_attn.q.diff_b",
                Part::DiffBias,
            ),
        ] {
            assert_eq!(parsed(name), (q.clone(), part), "{name}");
        }
        assert_eq!(
            parsed("diffusion_model.blocks.1.norm3.bias.diff_b"),
            ("blocks.1.norm3".to_owned(), Part::DiffBias)
        );
        assert_eq!(
            parsed("lora_unet_blocks_12_cross_attn_norm_k_img.alpha"),
            ("blocks.12.cross_attn.norm_k_img".to_owned(), Part::Alpha)
        );
        assert_eq!(
            parsed("lora_unet_time_projection_1.lora_up.weight"),
            ("time_projection.1".to_owned(), Part::Up)
        );
        for (diffusers, wan) in [
            ("blocks.2.attn2.to_out.0", "blocks.2.cross_attn.o"),
            ("blocks.2.ffn.net.0.proj", "blocks.2.ffn.0"),
            ("blocks.2.ffn.net.2", "blocks.2.ffn.2"),
            ("blocks.2.norm2", "blocks.2.norm3"),
            ("proj_out", "head.head"),
        ] {
            assert_eq!(diffusers_to_wan(diffusers).as_deref(), Some(wan));
        }
    }

    #[test]
    fn names_no_layout_knows_are_not_parsed() {
        for name in [
            "diffusion_model.blocks.0.self_attn.q.weight",
            "lora_unet_blocks_0_self_attn_q.hada_w1_a",
            "transformer.blocks.0.attn1.to_qq.lora_A.weight",
            "transformer.blocks.x.attn1.to_q.lora_A.weight",
            "lora_unet_blocks_0_self_attn_qq.lora_down.weight",
        ] {
            assert_eq!(parse_key(name), None, "{name}");
        }
    }
}
