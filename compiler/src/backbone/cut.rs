//! Cut: the frozen part of the backbone, from the image input to the feature tensor a head reads.
//!
//! A cut at a `[1, C]` tensor (the default: the pooled features before the old classifier) is used
//! as is. A cut at a `[1, C, H, W]` feature map (an earlier block) gets a global average pool, so
//! every cut yields a `[1, D]` feature vector.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

use crate::backbone::import::Backbone;
use crate::error::{CompileError, Result};

impl Backbone {
    /// Cuts the graph at tensor `cut`: the result computes that tensor from the image input
    /// (globally average-pooled to `[1, C]` when it is a `[1, C, H, W]` feature map).
    pub fn cut(self, cut: &str) -> Result<CutBackbone> {
        let typed = self.typed_with_outputs(&[cut.to_string()])?;
        CutBackbone::new(self, cut.to_string(), typed)
    }
}

/// A backbone cut at a tensor; its single output is the `[1, D]` feature vector.
#[derive(Debug, Clone)]
pub struct CutBackbone {
    backbone: Backbone,
    cut: String,
    cut_shape: Vec<usize>,
    model: TypedModel,
}

impl CutBackbone {
    fn new(backbone: Backbone, cut: String, mut model: TypedModel) -> Result<CutBackbone> {
        let invalid = |reason: String| CompileError::InvalidCut {
            path: backbone.path().to_path_buf(),
            cut: cut.clone(),
            reason,
        };
        let output = model.output_outlets().map_err(CompileError::graph("cut"))?[0];
        let (cut_shape, features) = pooled_features(&mut model, output, "graft.pool", &invalid)?;
        let model = with_outputs(model, &[features])?;
        Ok(CutBackbone {
            backbone,
            cut,
            cut_shape,
            model,
        })
    }

    /// The backbone this was cut from.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// Name of the tensor the graph was cut at.
    pub fn cut_name(&self) -> &str {
        &self.cut
    }

    /// Shape of the cut tensor itself, before any pooling.
    pub fn cut_shape(&self) -> &[usize] {
        &self.cut_shape
    }

    /// Length of the feature vector fed to the head.
    pub fn feature_dim(&self) -> usize {
        self.cut_shape[1]
    }

    /// The decluttered graph from image to features.
    pub fn model(&self) -> &TypedModel {
        &self.model
    }

    pub(crate) fn into_parts(self) -> (Backbone, String, Vec<usize>, TypedModel) {
        (self.backbone, self.cut, self.cut_shape, self.model)
    }
}

/// Several cuts of one backbone computed by one graph: one forward pass per image gives the
/// features of every cut (what `graft advise` compares).
#[derive(Debug, Clone)]
pub struct MultiCut {
    cuts: Vec<(String, Vec<usize>)>,
    model: TypedModel,
}

impl MultiCut {
    /// Cuts `backbone` at every tensor of `cuts` at once; output `k` is the `[1, D]` feature
    /// vector of `cuts[k]`, pooled as [`Backbone::cut`] pools it.
    pub fn new(backbone: &Backbone, cuts: &[String]) -> Result<MultiCut> {
        let mut model = backbone.typed_with_outputs(cuts)?;
        let outputs = model
            .output_outlets()
            .map_err(CompileError::graph("cut"))?
            .to_vec();
        let mut features = Vec::new();
        let mut described = Vec::new();
        for (k, (&outlet, name)) in outputs.iter().zip(cuts).enumerate() {
            let invalid = |reason: String| CompileError::InvalidCut {
                path: backbone.path().to_path_buf(),
                cut: name.clone(),
                reason,
            };
            let (shape, pooled) =
                pooled_features(&mut model, outlet, &format!("graft.pool{k}"), &invalid)?;
            features.push(pooled);
            described.push((name.clone(), shape));
        }
        let model = with_outputs(model, &features)?;
        Ok(MultiCut {
            cuts: described,
            model,
        })
    }

    /// The cut tensors with their shapes (before pooling), in output order.
    pub fn cuts(&self) -> &[(String, Vec<usize>)] {
        &self.cuts
    }

    /// The decluttered graph from image to every cut's features.
    pub fn model(&self) -> &TypedModel {
        &self.model
    }
}

/// `model` computing just `outputs`, decluttered and checked.
fn with_outputs(mut model: TypedModel, outputs: &[OutletId]) -> Result<TypedModel> {
    let graph = CompileError::graph("cut");
    model.select_output_outlets(outputs).map_err(&graph)?;
    let model = model.into_decluttered().map_err(&graph)?;
    model.check_consistency().map_err(&graph)?;
    Ok(model)
}

/// Checks that `outlet` holds fixed-shape f32 features, `[1, C]` or `[1, C, H, W]`, and returns
/// its shape and the `[1, C]` features (global-average-pooled for a map; pool nodes named with
/// `prefix`).
fn pooled_features(
    model: &mut TypedModel,
    outlet: OutletId,
    prefix: &str,
    invalid: &dyn Fn(String) -> CompileError,
) -> Result<(Vec<usize>, OutletId)> {
    let fact = model
        .outlet_fact(outlet)
        .map_err(CompileError::graph("cut"))?
        .clone();
    let shape: Vec<usize> = fact
        .shape
        .as_concrete()
        .ok_or_else(|| invalid(format!("its shape {:?} is not fixed", fact.shape)))?
        .to_vec();
    if fact.datum_type != f32::datum_type() {
        return Err(invalid(format!(
            "it holds {:?}, not f32 features",
            fact.datum_type
        )));
    }
    let features = match shape[..] {
        [1, _] => outlet,
        [1, _, h, w] => global_average_pool(model, outlet, h * w, prefix)?,
        _ => {
            return Err(invalid(format!(
                "its shape {shape:?} is neither [1, C] features nor a [1, C, H, W] feature map"
            )))
        }
    };
    Ok((shape, features))
}

/// Wires `mean over H, W` of a `[1, C, H, W]` outlet, giving `[1, C]`; node names start with
/// `prefix`.
fn global_average_pool(
    model: &mut TypedModel,
    input: OutletId,
    area: usize,
    prefix: &str,
) -> Result<OutletId> {
    let wire = |model: &mut TypedModel| -> TractResult<OutletId> {
        let sum = model.wire_node(
            format!("{prefix}.sum"),
            Reduce::new(tvec![2, 3], Reducer::Sum),
            &[input],
        )?[0];
        let scale = model.add_const(
            format!("{prefix}.scale"),
            tensor0(1.0f32 / area as f32).broadcast_into_rank(4)?,
        )?;
        let mean = model.wire_node(format!("{prefix}.mean"), math::mul(), &[sum, scale])?[0];
        let squeezed = model.wire_node(format!("{prefix}.squeeze_w"), AxisOp::Rm(3), &[mean])?[0];
        Ok(model.wire_node(format!("{prefix}.features"), AxisOp::Rm(2), &[squeezed])?[0])
    };
    wire(model).map_err(CompileError::graph("cut"))
}
