//! Which matrix products are 1x1 convolutions in disguise, and how to compute them as one
//! `[O, K] x [K, P]` int8 product.
//!
//! tract's declutter leaves a 1x1 convolution as an `EinSum` whose axes depend on what surrounds
//! it: `IHW,OI->OHW`, `NIHW,OI->NOHW` (batch kept), `IHW,OI->NOHW` (a branch of a split), and in
//! channels-last networks (ConvNeXt's `Linear` layers between two transposes) `akbm,kn->bmn` or
//! `bmk,kn->anbm`, where the transposes were absorbed into the product. Each is the same
//! computation: one contracted axis `k` (input channels) shared by the activations and the
//! weights, one weight axis `o` (output channels) in the output, every other activation axis a
//! pixel axis that the output keeps, and unit axes summed away or added. [`Layout`] records them
//! and the axis moves that bring the activations to `[K, P]` and the `[O, P]` result back to the
//! original output, so that the runtime's int8 kernel (`kn,mk,...->mn`) runs every such layer.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// How a pointwise product's operands and output are laid out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    /// The activations' axes (letters).
    x: Vec<char>,
    /// The output's axes.
    y: Vec<char>,
    /// The contracted (input channel) axis.
    k: char,
    /// The output channel axis.
    o: char,
    /// Whether the weights are stored `[K, O]` (else `[O, K]`).
    pub(crate) weights_transposed: bool,
}

impl Layout {
    /// The layout of `einsum` with activations of shape `x_shape` and constant weights of rank
    /// 2, when it is a pointwise product.
    pub(crate) fn of(einsum: &EinSum, x_shape: &[usize], y_shape: &[usize]) -> Option<Layout> {
        let expr = einsum.axes.to_string();
        let (inputs, output) = expr.split_once("->")?;
        let (x, w) = inputs.split_once(',')?;
        let (x, w, y): (Vec<char>, Vec<char>, Vec<char>) = (
            x.chars().collect(),
            w.chars().collect(),
            output.chars().collect(),
        );
        if w.len() != 2 || x.len() != x_shape.len() || y.len() != y_shape.len() {
            return None;
        }
        let k = *w.iter().find(|c| x.contains(c) && !y.contains(c))?;
        let o = *w.iter().find(|c| y.contains(c) && !x.contains(c))?;
        // Other activation axes: kept (pixels) or unit and summed away; other output axes:
        // pixels or unit and added.
        let x_ok = x
            .iter()
            .zip(x_shape)
            .all(|(c, &d)| *c == k || y.contains(c) || d == 1);
        let y_ok = y
            .iter()
            .zip(y_shape)
            .all(|(c, &d)| *c == o || x.contains(c) || d == 1);
        if !x_ok || !y_ok || x.iter().filter(|&&c| c == k).count() != 1 {
            return None;
        }
        Some(Layout {
            weights_transposed: w[0] == k,
            x,
            y,
            k,
            o,
        })
    }

    /// Pixel axes, in the activations' order.
    fn pixels(&self) -> Vec<char> {
        self.x
            .iter()
            .copied()
            .filter(|c| *c != self.k && self.y.contains(c))
            .collect()
    }

    /// Wires the activations `x` (shape as in the original graph) to `[K, P]`; returns it and
    /// the pixel dims.
    pub(crate) fn wire_input(
        &self,
        model: &mut TypedModel,
        name: &str,
        x: OutletId,
    ) -> TractResult<(OutletId, TVec<TDim>)> {
        let mut letters = self.x.clone();
        let mut x = x;
        let mut step = 0;
        let mut wire = |model: &mut TypedModel, op: AxisOp, x: OutletId| -> TractResult<OutletId> {
            step += 1;
            Ok(model.wire_node(format!("{name}.to_matrix.{step}"), op, &[x])?[0])
        };
        // Summed-away unit axes go first, from the back.
        for i in (0..letters.len()).rev() {
            if letters[i] != self.k && !self.y.contains(&letters[i]) {
                x = wire(model, AxisOp::Rm(i), x)?;
                letters.remove(i);
            }
        }
        let k_at = letters
            .iter()
            .position(|&c| c == self.k)
            .expect("k is an x axis");
        if k_at != 0 {
            x = wire(model, AxisOp::Move(k_at, 0), x)?;
            letters.remove(k_at);
            letters.insert(0, self.k);
        }
        let dims: TVec<TDim> = model
            .outlet_fact(x)?
            .shape
            .iter()
            .skip(1)
            .cloned()
            .collect();
        let pixels: TDim = dims.iter().product();
        match dims.len() {
            0 => x = wire(model, AxisOp::Add(1), x)?,
            1 => {}
            _ => x = wire(model, AxisOp::Reshape(1, dims.clone(), tvec![pixels]), x)?,
        }
        Ok((x, dims))
    }

    /// Wires the `[O, P]` product `y` back to the original output's axes.
    pub(crate) fn wire_output(
        &self,
        model: &mut TypedModel,
        name: &str,
        y: OutletId,
        pixel_dims: TVec<TDim>,
    ) -> TractResult<OutletId> {
        let mut y = y;
        let mut step = 0;
        let mut wire = |model: &mut TypedModel, op: AxisOp, y: OutletId| -> TractResult<OutletId> {
            step += 1;
            Ok(model.wire_node(format!("{name}.from_matrix.{step}"), op, &[y])?[0])
        };
        match pixel_dims.len() {
            0 => y = wire(model, AxisOp::Rm(1), y)?,
            1 => {}
            _ => {
                let pixels: TDim = pixel_dims.iter().product();
                y = wire(model, AxisOp::Reshape(1, tvec![pixels], pixel_dims), y)?;
            }
        }
        let mut letters: Vec<char> = std::iter::once(self.o).chain(self.pixels()).collect();
        // Kept axes in the output's order, then the added unit axes.
        let kept: Vec<char> = self
            .y
            .iter()
            .copied()
            .filter(|c| letters.contains(c))
            .collect();
        for (target, c) in kept.iter().enumerate() {
            let at = letters.iter().position(|l| l == c).expect("kept axis");
            if at != target {
                y = wire(model, AxisOp::Move(at, target), y)?;
                let moved = letters.remove(at);
                letters.insert(target, moved);
            }
        }
        for (i, c) in self.y.iter().enumerate() {
            if !letters.contains(c) {
                y = wire(model, AxisOp::Add(i), y)?;
                letters.insert(i, *c);
            }
        }
        Ok(y)
    }
}

/// `weights` as `[O, K]`.
pub(crate) fn weights_oi(weights: &Tensor, layout: &Layout) -> TractResult<Tensor> {
    if layout.weights_transposed {
        weights.clone().permute_axes(&[1, 0])
    } else {
        Ok(weights.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::run_once;
    use tract_onnx::tract_core::internal::Approximation;

    fn layout(expr: &str, x: &[usize], y: &[usize]) -> Option<Layout> {
        Layout::of(&EinSum::new(expr.parse().unwrap(), f32::datum_type()), x, y)
    }

    #[test]
    fn pointwise_products_are_recognised_in_every_layout() {
        assert!(layout("IHW,OI->OHW", &[32, 7, 7], &[16, 7, 7]).is_some());
        // Batch summed away, kept, or added.
        assert!(layout("NIHW,OI->OHW", &[1, 32, 7, 7], &[16, 7, 7]).is_some());
        assert!(layout("NIHW,OI->NOHW", &[1, 32, 7, 7], &[1, 16, 7, 7]).is_some());
        assert!(layout("IHW,OI->NOHW", &[32, 7, 7], &[1, 16, 7, 7]).is_some());
        // Channels last, transposes absorbed; weights [K, O].
        let nhwc = layout("akbm,kn->bmn", &[1, 16, 56, 56], &[56, 56, 64]).unwrap();
        assert!(nhwc.weights_transposed);
        assert!(layout("bmk,kn->anbm", &[56, 56, 64], &[1, 16, 56, 56]).is_some());
        // A batch of two, or an image axis, summed away is not a convolution.
        assert!(layout("NIHW,OI->OHW", &[2, 32, 7, 7], &[16, 7, 7]).is_none());
        assert!(layout("IHW,OI->OW", &[32, 7, 7], &[16, 7]).is_none());
    }

    /// The rewiring computes what the einsum computes, for every layout above.
    #[test]
    fn matrix_form_reproduces_the_einsum() {
        type Case<'a> = (&'a str, &'a [usize], &'a [usize], &'a [usize]);
        let cases: &[Case] = &[
            ("IHW,OI->OHW", &[3, 2, 5], &[4, 3], &[4, 2, 5]),
            ("NIHW,OI->NOHW", &[1, 3, 2, 5], &[4, 3], &[1, 4, 2, 5]),
            ("IHW,OI->NOHW", &[3, 2, 5], &[4, 3], &[1, 4, 2, 5]),
            ("akbm,kn->bmn", &[1, 3, 2, 5], &[3, 4], &[2, 5, 4]),
            ("bmk,kn->anbm", &[2, 5, 3], &[3, 4], &[1, 4, 2, 5]),
            // No pixel axis at all: a dense layer on pooled features.
            ("mk,nk->mn", &[1, 3], &[4, 3], &[1, 4]),
        ];
        for &(expr, x_shape, w_shape, y_shape) in cases {
            let einsum = EinSum::new(expr.parse().unwrap(), f32::datum_type());
            let layout = Layout::of(&einsum, x_shape, y_shape).expect(expr);
            let len = |s: &[usize]| s.iter().product::<usize>();
            let x = Tensor::from_shape(
                x_shape,
                &(0..len(x_shape))
                    .map(|i| i as f32 * 0.5 - 3.0)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            let w = Tensor::from_shape(
                w_shape,
                &(0..len(w_shape))
                    .map(|i| (i % 5) as f32 - 2.0)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            let mut reference = TypedModel::default();
            let source = reference.add_source("x", f32::fact(x_shape)).unwrap();
            let weights = reference.add_const("w", w.clone()).unwrap();
            let y = reference
                .wire_node("e", einsum.clone(), &[source, weights])
                .unwrap();
            reference.select_output_outlets(&y).unwrap();

            let mut matrix = TypedModel::default();
            let source = matrix.add_source("x", f32::fact(x_shape)).unwrap();
            let (flat, dims) = layout.wire_input(&mut matrix, "p", source).unwrap();
            let weights = matrix
                .add_const("w", weights_oi(&w, &layout).unwrap())
                .unwrap();
            let product = matrix
                .wire_node(
                    "mm",
                    EinSum::new("kn,mk->mn".parse().unwrap(), f32::datum_type()),
                    &[flat, weights],
                )
                .unwrap()[0];
            let y = layout.wire_output(&mut matrix, "p", product, dims).unwrap();
            matrix.select_output_outlets(&[y]).unwrap();
            let (a, b) = (run_once(&reference, &x), run_once(&matrix, &x));
            assert_eq!(a.shape(), y_shape, "{expr}");
            a.close_enough(&b, Approximation::Exact).expect(expr);
        }
    }
}
