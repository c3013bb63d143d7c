//! DDP's gradient buckets: which tensors travel together, flattened into one message.

use std::ops::Range;

use tch::Tensor;
use torch_sys::C_tensor;

use super::ffi::{self, shim_call};
use super::{DistError, ProcessGroup};

/// How [`ProcessGroup::all_reduce_mean`] and [`ProcessGroup::broadcast`] group `tensors`: runs of
/// consecutive tensors of one kind and device, cut so that each holds at most `cap_bytes` (a
/// tensor larger than that gets a bucket of its own). Deterministic, so every rank cuts the same
/// buckets from the same list.
pub fn buckets(tensors: &[Tensor], cap_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let same = i > start && {
            let first = &tensors[start];
            first.kind() == t.kind() && first.device() == t.device()
        };
        if i > start && (!same || bytes + size > cap_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// One contiguous tensor holding `tensors`' elements in order. A lone contiguous tensor is used as
/// it is, which spares large gradients a copy.
pub(super) fn flatten(tensors: &[Tensor]) -> Result<Tensor, DistError> {
    if let [t] = tensors
        && t.is_contiguous()
    {
        return Ok(t.detach());
    }
    let views = tensors.iter().map(|t| t.f_reshape([-1])).collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&views, 0)?)
}

pub(super) fn unflatten(flat: &Tensor, tensors: &[Tensor]) -> Result<(), DistError> {
    if let [t] = tensors
        && t.is_contiguous()
        && t.data_ptr() == flat.data_ptr()
    {
        return Ok(());
    }
    let mut offset = 0i64;
    for t in tensors {
        let n = t.numel() as i64;
        let src = flat.f_narrow(0, offset, n)?.f_view_as(t)?;
        t.shallow_clone().f_copy_(&src)?;
        offset += n;
    }
    Ok(())
}

/// Averages the gradients of `vars` across the ranks of `pg`; call it after `backward()` and
/// before the optimiser step.
///
/// Variables that do not require grad are skipped. A variable whose gradient is undefined on this
/// rank (a branch it did not use) counts as a zero gradient, so every rank sends the same buckets;
/// afterwards it holds the averaged gradient like the others, keeping the replicas identical.
pub fn average_gradients(pg: &ProcessGroup, vars: &[Tensor]) -> Result<(), DistError> {
    if pg.world_size() == 1 {
        return Ok(());
    }
    let trainable: Vec<&Tensor> = vars.iter().filter(|v| v.defined() && v.requires_grad()).collect();
    let mut grads = Vec::with_capacity(trainable.len());
    let mut missing = Vec::new();
    for (i, v) in trainable.iter().enumerate() {
        let g = v.grad();
        if g.defined() {
            grads.push(g);
        } else {
            grads.push(tch::no_grad(|| v.f_zeros_like())?);
            missing.push(i);
        }
    }
    pg.all_reduce_mean(&grads)?;
    for i in missing {
        // SAFETY: both are live tch tensors for the duration of the call.
        let (rc, err) = shim_call(|err| unsafe {
            ffi::brats_dist_set_grad(trainable[i].as_ptr() as *mut C_tensor, grads[i].as_ptr() as *mut C_tensor, err)
        });
        if rc != 0 {
            return Err(DistError::InvalidArgument {
                op: "average_gradients",
                reason: format!("setting variable {i}'s gradient: {}", err.unwrap_or_default()),
            });
        }
    }
    Ok(())
}
