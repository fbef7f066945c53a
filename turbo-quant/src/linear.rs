//! [`Linear`]: one layer type that is either a float linear or a W8A8 int8 one, so that model code
//! never branches on the precision of its layers.

use std::cell::OnceCell;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use turbo_core::{Error, Result};

use crate::op::{add_bias, gemm_kernel, int8_matmul_tiles, quantize_activations};
use crate::tile::{quantize_tiles, tile_grid, TileMatrix};

/// Checkpoint key of the int8 values of a quantised layer (`-quant` files).
pub const INT8_WEIGHT_KEY: &str = "int8_weight";
/// Checkpoint key of the f32 tile scales of a quantised layer.
pub const SCALE_KEY: &str = "scale";
/// Checkpoint key of the weight of a float layer.
pub const WEIGHT_KEY: &str = "weight";
/// Checkpoint key of the bias (both kinds of layer).
pub const BIAS_KEY: &str = "bias";

/// What [`Linear::load`] does with a layer stored in float. A layer stored quantised is always
/// loaded as int8, whatever the policy: dequantising it would cost memory and speed and recover
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantPolicy {
    /// Keep float layers in float.
    #[default]
    KeepFloat,
    /// Quantise float layers to W8A8 at load (TurboDiffusion's `--quant_linear` on a bf16
    /// checkpoint).
    Quantize,
}

/// Int8 weights `[N, K]` stored one byte per element (`U8` holding two's-complement int8, since
/// candle has no int8 dtype) and their f32 scales `[⌈N/128⌉, ⌈K/128⌉]`, one per 128×128 tile.
#[derive(Debug, Clone)]
pub struct Int8Weight {
    values: Tensor,
    scale: Tensor,
}

impl Int8Weight {
    /// From a checkpoint's `int8_weight` (`U8` bytes, `[N, K]`) and `scale` (any float dtype,
    /// kept as f32).
    pub fn new(int8_weight: Tensor, scale: Tensor) -> Result<Self> {
        if int8_weight.dtype() != DType::U8 {
            return Err(Error::UnsupportedDType {
                what: INT8_WEIGHT_KEY.into(),
                dtype: int8_weight.dtype(),
                expected: "U8 (the int8 bytes; candle has no int8 dtype)",
            });
        }
        let (rows, cols) = match *int8_weight.dims() {
            [rows, cols] => (rows, cols),
            ref dims => return Err(shape_error(INT8_WEIGHT_KEY, "[N, K]", dims)),
        };
        check_shape(SCALE_KEY, &scale, &tile_grid(rows, cols))?;
        Ok(Self {
            values: int8_weight.contiguous()?,
            scale: scale.to_dtype(DType::F32)?.contiguous()?,
        })
    }

    /// Quantises a float `[N, K]` weight tile by tile (see
    /// [`quantize_tiles`](crate::quantize_tiles)).
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (rows, cols) = match *weight.dims() {
            [rows, cols] => (rows, cols),
            ref dims => return Err(shape_error(WEIGHT_KEY, "[N, K]", dims)),
        };
        #[cfg(feature = "cuda")]
        if weight.device().is_cuda() && cols % 16 == 0 {
            let (values, scale) = crate::cuda::quantize_tensor(weight)?;
            return Self::new(values, scale);
        }
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let quantized = quantize_tiles(&values, rows, cols)?;
        let device = weight.device();
        Self::new(
            int8_tensor(&quantized.values, (rows, cols), device)?,
            Tensor::from_vec(quantized.scales, tile_grid(rows, cols).to_vec(), device)?,
        )
    }

    /// The int8 values as `U8` bytes, `[N, K]`.
    pub fn int8_weight(&self) -> &Tensor {
        &self.values
    }

    /// The f32 tile scales, `[⌈N/128⌉, ⌈K/128⌉]`.
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// `(N, K)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        let dims = self.values.dims();
        (dims[0], dims[1])
    }

    /// The int8 values read back as `i8`.
    pub fn int8_values(&self) -> Result<Vec<i8>> {
        let bytes = self.values.flatten_all()?.to_vec1::<u8>()?;
        Ok(bytes.into_iter().map(|b| b as i8).collect())
    }

    /// `q · scale` as an f32 `[N, K]` tensor.
    pub fn dequantize(&self) -> Result<Tensor> {
        let (rows, cols) = self.dims();
        let values = self.int8_values()?;
        let scales = self.scale.flatten_all()?.to_vec1::<f32>()?;
        let dequantized = TileMatrix::new(&values, &scales, rows, cols)?.dequantize();
        Ok(Tensor::from_vec(
            dequantized,
            (rows, cols),
            self.values.device(),
        )?)
    }
}

/// A `U8` tensor holding the bytes of int8 `values`: the form in which int8 weights travel
/// through candle (and through a [`VarBuilder`] built with `VarBuilder::from_tensors`).
pub fn int8_tensor(
    values: &[i8],
    shape: impl Into<candle_core::Shape>,
    device: &Device,
) -> Result<Tensor> {
    let bytes: &[u8] = bytemuck::cast_slice(values);
    Ok(Tensor::from_slice(bytes, shape, device)?)
}

#[derive(Debug, Clone)]
enum Weight {
    /// `[N, K]` in the layer's compute dtype.
    Float(Tensor),
    Int8(Int8Weight),
}

/// A linear layer `y = x·Wᵀ + b`, float or W8A8 int8, behind one [`Module`] implementation.
///
/// `forward` takes `[.., K]` inputs with any number of leading dimensions and returns `[.., N]`
/// in the input's dtype (f32, bf16 or f16):
/// - float layers compute in the weight's dtype (the input is cast to it and the output back);
/// - int8 layers quantise the input into 128×128 tiles (rows are the flattened leading
///   dimensions; once for the layers that share a [`LinearInput`], else per call), run the
///   block-scaled int8 GEMM in i32/f32, round the result to the input dtype
///   and add the bias in that dtype, as TurboDiffusion's `Int8Linear` does. The int8 product
///   runs on the CPU; other devices report that the op has no kernel there yet.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// A low-rank term added at run time (LoRA adapters on int8 weights, or on float weights
    /// that must stay unmerged): `y += (x·downᵀ)·upᵀ`.
    low_rank: Option<LowRank>,
}

/// The factors of a run-time low-rank term `x·downᵀ·upᵀ`, `down` `[R, K]` and `up` `[N, R]`, the
/// adapter's scale folded into `up`. Several adapters are concatenated along R, so that any
/// number of them costs two thin matmuls per call.
#[derive(Debug, Clone)]
pub struct LowRank {
    down: Tensor,
    up: Tensor,
}

impl LowRank {
    /// `down` `[R, K]`, `up` `[N, R]`, in the dtype the term is computed in.
    pub fn new(down: Tensor, up: Tensor) -> Result<Self> {
        let (rank, _) = matrix_dims("low-rank `down`", &down)?;
        let (_, up_rank) = matrix_dims("low-rank `up`", &up)?;
        if up_rank != rank || up.dtype() != down.dtype() {
            return Err(Error::Shape {
                what: format!(
                    "low-rank `up` ({:?}) for `down` {:?}",
                    up.dtype(),
                    down.dims()
                ),
                expected: format!("[N, {rank}] in {:?}", down.dtype()),
                got: up.dims().to_vec(),
            });
        }
        Ok(Self { down, up })
    }

    /// R: the summed rank of the adapters in the term.
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// Both terms in one, concatenated along the rank.
    fn concat(&self, other: &Self) -> Result<Self> {
        let dtype = self.down.dtype();
        Self::new(
            Tensor::cat(&[&self.down, &other.down.to_dtype(dtype)?], 0)?,
            Tensor::cat(&[&self.up, &other.up.to_dtype(dtype)?], 1)?,
        )
    }

    /// `(x·downᵀ)·upᵀ` of a `[rows, K]` matrix, in `dtype`.
    fn forward(&self, x: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        x.to_dtype(self.down.dtype())?
            .matmul(&self.down.t()?)?
            .matmul(&self.up.t()?)?
            .to_dtype(dtype)
    }
}

impl Linear {
    /// A float layer from a `[N, K]` weight and an optional `[N]` bias; it computes in the
    /// weight's dtype.
    pub fn from_float(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let out_dim = match *weight.dims() {
            [rows, _] => rows,
            ref dims => return Err(shape_error(WEIGHT_KEY, "[N, K]", dims)),
        };
        let bias = checked_bias(bias, out_dim)?
            .map(|b| b.to_dtype(weight.dtype()))
            .transpose()?;
        Ok(Self {
            weight: Weight::Float(weight),
            bias,
            low_rank: None,
        })
    }

    /// An int8 layer quantised from a float `[N, K]` weight (quantisation at load).
    pub fn quantize(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::from_int8_weight(Int8Weight::quantize(weight)?, bias)
    }

    /// An int8 layer from the tensors of a `-quant` checkpoint: `int8_weight` as `U8` bytes
    /// `[N, K]`, `scale` `[⌈N/128⌉, ⌈K/128⌉]` and an optional `bias` `[N]` (kept in its dtype).
    pub fn from_int8(int8_weight: Tensor, scale: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::from_int8_weight(Int8Weight::new(int8_weight, scale)?, bias)
    }

    /// An int8 layer from an already built [`Int8Weight`].
    pub fn from_int8_weight(weight: Int8Weight, bias: Option<Tensor>) -> Result<Self> {
        let bias = checked_bias(bias, weight.dims().0)?;
        Ok(Self {
            weight: Weight::Int8(weight),
            bias,
            low_rank: None,
        })
    }

    /// Loads the layer under `vb`, detecting how it is stored:
    /// - `int8_weight` + `scale` (a `-quant` checkpoint): loaded as int8, whatever `policy` says;
    /// - `weight`: kept in float (in `vb`'s dtype) or quantised, as `policy` says.
    ///
    /// `bias` is loaded when present, in `vb`'s dtype. A mismatch between `policy` and the file
    /// is not an error: what was done is logged at debug level and can be read back with
    /// [`Linear::is_int8`].
    ///
    /// `int8_weight` must be a `U8` tensor holding the int8 bytes: a `VarBuilder` cannot read
    /// safetensors' `I8` dtype, so a caller holding the raw file wraps each `I8` tensor's bytes
    /// as `U8` (for instance with [`int8_tensor`]) and builds the `VarBuilder` with
    /// `VarBuilder::from_tensors`, or provides its own backend that does so.
    ///
    /// Errors: a tensor whose shape is not the expected one (naming the key and both shapes),
    /// or a missing `weight` when the layer is not stored quantised.
    pub fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        policy: QuantPolicy,
    ) -> Result<Self> {
        let bias = if vb.contains_tensor(BIAS_KEY) {
            Some(load_checked(&vb, BIAS_KEY, &[out_dim], vb.dtype())?)
        } else {
            None
        };
        if vb.contains_tensor(INT8_WEIGHT_KEY) {
            let int8_weight = load_checked(&vb, INT8_WEIGHT_KEY, &[out_dim, in_dim], DType::U8)?;
            let scale = load_checked(&vb, SCALE_KEY, &tile_grid(out_dim, in_dim), DType::F32)?;
            let layer = vb.prefix();
            tracing::debug!(%layer, requested = ?policy, "stored as int8: loaded as int8");
            return Self::from_int8(int8_weight, scale, bias);
        }
        let weight = load_checked(&vb, WEIGHT_KEY, &[out_dim, in_dim], vb.dtype())?;
        let (layer, dtype) = (vb.prefix(), weight.dtype());
        match policy {
            QuantPolicy::KeepFloat => {
                tracing::debug!(%layer, ?dtype, "stored in float: kept in float");
                Self::from_float(weight, bias)
            }
            QuantPolicy::Quantize => {
                tracing::debug!(%layer, ?dtype, "stored in float: quantised to int8 at load");
                Self::quantize(&weight, bias)
            }
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        match &self.weight {
            Weight::Float(weight) => weight.device(),
            Weight::Int8(weight) => weight.values.device(),
        }
    }

    /// Whether the layer computes in W8A8 int8.
    pub fn is_int8(&self) -> bool {
        matches!(self.weight, Weight::Int8(_))
    }

    /// The int8 weight, for an int8 layer.
    pub fn int8_weight(&self) -> Option<&Int8Weight> {
        match &self.weight {
            Weight::Int8(weight) => Some(weight),
            Weight::Float(_) => None,
        }
    }

    /// The `[N, K]` weight, for a float layer.
    pub fn float_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Float(weight) => Some(weight),
            Weight::Int8(_) => None,
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(in_dim, out_dim)`, i.e. `(K, N)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Float(weight) => {
                let dims = weight.dims();
                (dims[1], dims[0])
            }
            Weight::Int8(weight) => {
                let (rows, cols) = weight.dims();
                (cols, rows)
            }
        }
    }

    /// The same layer in float: int8 weights are dequantised (`q · scale`) to `dtype`.
    pub fn to_float(&self, dtype: DType) -> Result<Self> {
        let weight = match &self.weight {
            Weight::Float(weight) => weight.to_dtype(dtype)?,
            Weight::Int8(weight) => weight.dequantize()?.to_dtype(dtype)?,
        };
        Ok(Self {
            low_rank: self.low_rank.clone(),
            ..Self::from_float(weight, self.bias.clone())?
        })
    }

    /// The same layer in W8A8 int8: a float weight is quantised (its bias and run-time
    /// low-rank term kept); an int8 layer is returned as it is.
    pub fn quantized(&self) -> Result<Self> {
        match &self.weight {
            Weight::Int8(_) => Ok(self.clone()),
            Weight::Float(weight) => Ok(Self {
                low_rank: self.low_rank.clone(),
                ..Self::quantize(weight, self.bias.clone())?
            }),
        }
    }

    /// The run-time low-rank term, if any.
    pub fn low_rank(&self) -> Option<&LowRank> {
        self.low_rank.as_ref()
    }

    /// The layer with `term` added at run time (beside any term it already has). The layer's
    /// own weight is shared, not copied.
    pub fn with_low_rank(&self, term: LowRank) -> Result<Self> {
        let (in_dim, out_dim) = self.dims();
        let expected = format!("down [R, {in_dim}] and up [{out_dim}, R]");
        if term.down.dims()[1] != in_dim || term.up.dims()[0] != out_dim {
            return Err(Error::Shape {
                what: "low-rank term of a linear".into(),
                expected,
                got: [term.down.dims(), term.up.dims()].concat(),
            });
        }
        let low_rank = match &self.low_rank {
            Some(existing) => existing.concat(&term)?,
            None => term,
        };
        Ok(Self {
            low_rank: Some(low_rank),
            ..self.clone()
        })
    }

    /// The float layer with `delta` (`[N, K]`, any float dtype) added to its weight, the sum
    /// taken in f32 and stored in the weight's dtype. An int8 layer cannot be merged into
    /// without requantising: that is an error (run the delta as a [`LowRank`] term instead).
    pub fn with_weight_delta(&self, delta: &Tensor) -> Result<Self> {
        let Weight::Float(weight) = &self.weight else {
            return Err(Error::UnsupportedDType {
                what: "a weight difference merged into a linear".into(),
                dtype: DType::U8,
                expected: "a float weight (int8 weights take low-rank terms at run time)",
            });
        };
        check_shape(WEIGHT_KEY, delta, weight.dims())?;
        let merged = (weight.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
        Ok(Self {
            weight: Weight::Float(merged.to_dtype(weight.dtype())?),
            ..self.clone()
        })
    }

    /// The layer with `delta` `[N]` added to its bias (a layer without bias gets `delta` as
    /// its bias), in the bias's dtype (the float weight's, or f32 for an int8 layer without
    /// one).
    pub fn with_bias_delta(&self, delta: &Tensor) -> Result<Self> {
        check_shape(BIAS_KEY, delta, &[self.dims().1])?;
        let bias = match &self.bias {
            Some(bias) => (bias.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?
                .to_dtype(bias.dtype())?,
            None => match &self.weight {
                Weight::Float(weight) => delta.to_dtype(weight.dtype())?,
                Weight::Int8(_) => delta.to_dtype(DType::F32)?,
            },
        };
        Ok(Self {
            bias: Some(bias),
            ..self.clone()
        })
    }

    /// `x·Wᵀ (+ bias)` of `x`, `input` as a `[rows, in]` matrix, in the dtype the bias is added
    /// in (the float weight's, or x's for int8 weights), plus the run-time low-rank term when
    /// there is one.
    fn product(
        &self,
        x: &Tensor,
        input: &LinearInput<'_>,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            Weight::Float(weight) => float_product(&x.to_dtype(weight.dtype())?, weight, bias)?,
            Weight::Int8(weight) => {
                let y = int8_matmul_tiles(
                    input.tiles(x)?,
                    x.dtype(),
                    weight.int8_weight(),
                    weight.scale(),
                    gemm_kernel(),
                )?;
                with_bias(y, bias)?
            }
        };
        match &self.low_rank {
            Some(term) => {
                let dtype = y.dtype();
                y + term.forward(x, dtype)?
            }
            None => Ok(y),
        }
    }

    /// [`Module::forward`] of an input that other layers may read too (see [`LinearInput`]).
    pub fn forward_input(&self, input: &LinearInput<'_>) -> candle_core::Result<Tensor> {
        let x = input.x;
        self.map_rows(x, |rows| {
            self.product(rows, input, self.bias.as_ref())?
                .to_dtype(x.dtype())
        })
    }

    /// `x·Wᵀ` without the bias, in the dtype of `x`: for an op that adds [`Linear::bias`] as
    /// part of its own pass (the DiT's fused kernels).
    pub fn forward_unbiased(&self, input: &LinearInput<'_>) -> candle_core::Result<Tensor> {
        let x = input.x;
        self.map_rows(x, |rows| {
            self.product(rows, input, None)?.to_dtype(x.dtype())
        })
    }

    /// Applies `f` to `x` `[.., in]` as a `[rows, in]` matrix, giving `[.., out]`.
    fn map_rows(
        &self,
        x: &Tensor,
        f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (in_dim, out_dim) = self.dims();
        let (&features, leading) = match x.dims().split_last() {
            Some(split) => split,
            None => candle_core::bail!("linear: the input is a scalar, expected [.., {in_dim}]"),
        };
        if features != in_dim {
            candle_core::bail!(
                "linear: input shape {:?} does not end in the layer's {in_dim} input features",
                x.dims()
            );
        }
        let rows = leading.iter().product::<usize>();
        let y = f(&x.reshape((rows, in_dim))?)?;
        let mut out_dims = leading.to_vec();
        out_dims.push(out_dim);
        y.reshape(out_dims)
    }
}

/// `x · weightᵀ (+ bias)` in the weight's dtype: through cuBLASLt with the bias in its epilogue
/// for bf16 / f16 on CUDA, else candle's matmul and [`add_bias`].
fn float_product(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cublaslt::supports(x, weight) {
        let bias = bias.map(|b| b.to_dtype(weight.dtype())).transpose()?;
        return crate::cublaslt::linear(x, weight, bias.as_ref());
    }
    with_bias(x.matmul(&weight.t()?)?, bias)
}

/// `y + bias` in y's dtype.
fn with_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(bias) => add_bias(&y, &bias.to_dtype(y.dtype())?),
        None => Ok(y),
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_input(&LinearInput::new(x))
    }
}

/// The input `[.., K]` of one or more [`Linear`]s. Int8 layers quantise it into 128×128 tiles
/// (its leading dimensions flattened into rows); layers that read the same input (an
/// attention's q, k and v projections) share one `LinearInput`, so that it is quantised once,
/// by the first int8 layer that reads it, and the tiles are freed with it.
#[derive(Debug)]
pub struct LinearInput<'a> {
    x: &'a Tensor,
    tiles: OnceCell<Int8Weight>,
}

impl<'a> LinearInput<'a> {
    pub fn new(x: &'a Tensor) -> Self {
        Self {
            x,
            tiles: OnceCell::new(),
        }
    }

    /// The tiles of `rows`, which is this input as a `[rows, K]` matrix: quantised by the
    /// first call.
    fn tiles(&self, rows: &Tensor) -> candle_core::Result<&Int8Weight> {
        if let Some(tiles) = self.tiles.get() {
            return Ok(tiles);
        }
        let tiles = quantize_activations(rows)?;
        Ok(self.tiles.get_or_init(|| tiles))
    }
}

/// `vb`'s tensor `key` in `dtype`, checked to have `expected` dims; the error names the full
/// checkpoint key.
fn load_checked(vb: &VarBuilder, key: &str, expected: &[usize], dtype: DType) -> Result<Tensor> {
    let tensor = vb.get_unchecked_dtype(key, dtype)?;
    let full_key = match vb.prefix() {
        prefix if prefix.is_empty() => key.to_owned(),
        prefix => format!("{prefix}.{key}"),
    };
    check_shape(&full_key, &tensor, expected)?;
    Ok(tensor)
}

fn checked_bias(bias: Option<Tensor>, out_dim: usize) -> Result<Option<Tensor>> {
    if let Some(bias) = &bias {
        check_shape(BIAS_KEY, bias, &[out_dim])?;
    }
    Ok(bias)
}

fn check_shape(what: &str, tensor: &Tensor, expected: &[usize]) -> Result<()> {
    if tensor.dims() == expected {
        Ok(())
    } else {
        Err(shape_error(what, &format!("{expected:?}"), tensor.dims()))
    }
}

/// `(rows, cols)` of a 2-D tensor.
fn matrix_dims(what: &str, tensor: &Tensor) -> Result<(usize, usize)> {
    match *tensor.dims() {
        [rows, cols] => Ok((rows, cols)),
        ref dims => Err(shape_error(what, "[rows, cols]", dims)),
    }
}

fn shape_error(what: &str, expected: &str, got: &[usize]) -> Error {
    Error::Shape {
        what: what.to_owned(),
        expected: expected.to_owned(),
        got: got.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(dims: &[usize]) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?)
    }

    fn values(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Three int8 layers and a float one reading one `LinearInput` (rows that end inside a
    /// tile): each int8 product is that of the layer alone, the input is quantised by the first
    /// int8 layer only, and a float layer leaves it unquantised.
    #[test]
    fn layers_sharing_an_input_quantise_it_once() -> Result<()> {
        let x = gaussian(&[2, 150, 256])?.to_dtype(DType::BF16)?;
        let int8_layers = (0..3)
            .map(|_| Linear::quantize(&gaussian(&[96, 256])?, Some(gaussian(&[96])?)))
            .collect::<Result<Vec<_>>>()?;
        let float = Linear::from_float(gaussian(&[64, 256])?, None)?;

        let input = LinearInput::new(&x);
        float.forward_input(&input)?;
        assert!(
            input.tiles.get().is_none(),
            "a float layer quantised its input"
        );
        for layer in &int8_layers {
            assert_eq!(
                values(&layer.forward_input(&input)?)?,
                values(&layer.forward(&x)?)?
            );
        }
        let rows = x.reshape((300, 256))?;
        let quantised = input
            .tiles
            .get()
            .expect("the int8 layers quantised the input");
        assert_eq!(
            quantised.int8_values()?,
            Int8Weight::quantize(&rows)?.int8_values()?
        );

        // A layer reads the tiles already there: those of zeros leave only its bias.
        let zeros = LinearInput::new(&x);
        zeros
            .tiles
            .set(Int8Weight::quantize(&rows.zeros_like()?)?)
            .expect("a new input holds no tiles");
        let layer = &int8_layers[0];
        let bias = layer.bias().expect("biased").to_dtype(DType::BF16)?;
        let want = bias.broadcast_as((2, 150, 96))?;
        assert_eq!(values(&layer.forward_input(&zeros)?)?, values(&want)?);
        Ok(())
    }
}
