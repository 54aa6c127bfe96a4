//! Reading and writing ONNX protobuf values: tensors' numbers and nodes' attributes, shared by the
//! import rewrites and the candle translation.

use tract_onnx::pb;

/// ONNX `TensorProto.DataType` of float32.
pub(crate) const ONNX_FLOAT: i32 = 1;
/// ONNX `TensorProto.DataType` of int64.
pub(crate) const ONNX_INT64: i32 = 7;

/// A float tensor's values, checked against its dims.
pub(crate) fn float_values(proto: &pb::TensorProto) -> Result<Vec<f32>, String> {
    if !proto.external_data.is_empty() {
        return Err("weights stored as ONNX external data cannot be trained".into());
    }
    if proto.data_type != ONNX_FLOAT {
        return Err(format!(
            "holds ONNX data type {}, not float",
            proto.data_type
        ));
    }
    let count: usize = proto.dims.iter().map(|&d| d as usize).product();
    let values = little_endian(&proto.raw_data, &proto.float_data, f32::from_le_bytes);
    if values.len() != count {
        return Err(format!(
            "holds {} values for dims {:?}",
            values.len(),
            proto.dims
        ));
    }
    Ok(values)
}

/// An int64 tensor's values.
pub(crate) fn int64_values(proto: &pb::TensorProto) -> Vec<i64> {
    little_endian(&proto.raw_data, &proto.int64_data, i64::from_le_bytes)
}

/// A float tensor named `name` holding `values` with `dims`, stored as raw little-endian bytes.
pub(crate) fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: ONNX_FLOAT,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// A tensor's values: from `raw_data` (little-endian bytes) when present, else the typed field.
fn little_endian<T: Clone, const N: usize>(
    raw: &[u8],
    typed: &[T],
    from_bytes: fn([u8; N]) -> T,
) -> Vec<T> {
    if raw.is_empty() {
        return typed.to_vec();
    }
    raw.chunks_exact(N)
        .map(|b| from_bytes(b.try_into().expect("chunks of N bytes")))
        .collect()
}

/// A node's attribute.
pub(crate) fn attribute<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// An integer attribute, or `default`.
pub(crate) fn int(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attribute(node, name).map_or(default, |a| a.i)
}

/// A float attribute, or `default`.
pub(crate) fn float(node: &pb::NodeProto, name: &str, default: f32) -> f64 {
    attribute(node, name).map_or(default, |a| a.f) as f64
}

/// An integer list attribute.
pub(crate) fn ints(node: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attribute(node, name).map(|a| a.ints.clone())
}

/// How errors name a node: its name, else its operator and outputs.
pub(crate) fn node_name(node: &pb::NodeProto) -> String {
    if node.name.is_empty() {
        format!("{} -> {:?}", node.op_type, node.output)
    } else {
        node.name.clone()
    }
}
