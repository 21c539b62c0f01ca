//! NCCL for the gradient all-reduce on GPUs, through `cudarc`'s NCCL bindings (libnccl and libcuda loaded at
//! run time, so CPU-only machines build and run the same binary).
//!
//! Rank 0 makes the communicator's unique id (no GPU needed for that) and broadcasts its 128 bytes over MPI;
//! every rank binds its GPU (`cuda:<local rank>`) and joins. Buckets on the device are averaged in place
//! (`ncclAvg`) on the default stream, where libtorch queues its kernels, so the reduction follows the backward
//! pass and precedes the optimizer step without extra synchronisation.

use cudarc::nccl::{result, sys};
use tch::Tensor;

use crate::dist::{Dist, DistError};

/// Why NCCL cannot run here, in words a user can act on; `None` when both libraries load.
pub fn missing_libraries() -> Option<String> {
    // SAFETY: only tries to dlopen the libraries.
    let (driver, nccl) = unsafe { (cudarc::driver::sys::is_culib_present(), sys::is_culib_present()) };
    match (driver, nccl) {
        (true, true) => None,
        (false, _) => Some(
            "NCCL needs the NVIDIA driver's libcuda.so, which is not on this machine (no GPU driver installed); \
             CPU ranks all-reduce with MPI instead"
                .into(),
        ),
        (true, false) => Some(
            "libnccl.so was not found: install NCCL, or run scripts/setup (it links the libnccl.so.2 that the \
             torch wheel ships as libnccl.so)"
                .into(),
        ),
    }
}

/// The CUDA devices the driver sees: name and memory in bytes (no context is created). An error in words when
/// there is no driver or it fails to initialise.
pub fn cuda_devices() -> Result<Vec<(String, usize)>, String> {
    use cudarc::driver::result as driver;
    // SAFETY: dlopen probe.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no NVIDIA driver (libcuda.so) on this machine".into());
    }
    let err = |what: &str, e: cudarc::driver::DriverError| format!("{what}: {e:?}");
    driver::init().map_err(|e| err("cuInit", e))?;
    let count = driver::device::get_count().map_err(|e| err("cuDeviceGetCount", e))?;
    (0..count)
        .map(|i| {
            let dev = driver::device::get(i).map_err(|e| err("cuDeviceGet", e))?;
            let name = driver::device::get_name(dev).map_err(|e| err("cuDeviceGetName", e))?;
            // SAFETY: a device handle the driver just returned.
            let bytes = unsafe { driver::device::total_mem(dev) }.map_err(|e| err("cuDeviceTotalMem", e))?;
            Ok((name, bytes))
        })
        .collect()
}

/// libnccl's version (e.g. 22803 for 2.28.3), when the library loads (no GPU needed).
pub fn version() -> Option<i32> {
    // SAFETY: dlopen probe, then a call that only writes the integer it is given.
    unsafe {
        if !sys::is_culib_present() {
            return None;
        }
        let mut v = 0;
        (sys::ncclGetVersion(&mut v) == sys::ncclResult_t::ncclSuccess).then_some(v)
    }
}

/// Rank 0's fresh unique id on every rank (needs libnccl, not a GPU).
pub fn shared_unique_id(dist: &Dist) -> Result<[u8; 128], DistError> {
    // SAFETY: dlopen probe.
    if !unsafe { sys::is_culib_present() } {
        return Err(DistError::Nccl(missing_libraries().unwrap_or_else(|| "libnccl.so not found".into())));
    }
    let mut bytes = [0u8; 128];
    if dist.rank == 0 {
        let id = result::get_uniqueid().map_err(|e| DistError::Nccl(format!("ncclGetUniqueId: {e:?}")))?;
        for (b, c) in bytes.iter_mut().zip(id.internal) {
            *b = c as u8;
        }
    }
    dist.broadcast_bytes(&mut bytes);
    Ok(bytes)
}

/// One rank's NCCL communicator on its GPU.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    pub ordinal: usize,
    /// The device's primary context, which the communicator's buffers live in, held for as long as it lives:
    /// dropping cudarc's handle releases it, and a primary context whose last holder lets go is reset.
    _context: std::sync::Arc<cudarc::driver::CudaContext>,
}

impl NcclComm {
    /// Joins the job's communicator on GPU `ordinal` (collective: every rank calls it).
    pub fn new(dist: &Dist, ordinal: usize) -> Result<NcclComm, DistError> {
        if let Some(why) = missing_libraries() {
            return Err(DistError::Nccl(why));
        }
        let id_bytes = shared_unique_id(dist)?;
        // libtorch first: its runtime holds the device's primary context from here on (whichever of NCCL and
        // libtorch touches the GPU first, they share that one context).
        let _ = Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cuda(ordinal)));
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| DistError::Nccl(format!("CUDA device {ordinal}: {e:?}")))?;
        ctx.bind_to_thread().map_err(|e| DistError::Nccl(format!("CUDA device {ordinal}: {e:?}")))?;
        let id = sys::ncclUniqueId { internal: id_bytes.map(|b| b as ::core::ffi::c_char) };
        let mut comm = std::ptr::null_mut();
        // SAFETY: a fresh communicator handle, the id every rank received, this rank's place.
        unsafe { result::comm_init_rank(&mut comm, dist.world_size as i32, id, dist.rank as i32) }.map_err(|e| {
            DistError::Nccl(format!("ncclCommInitRank (rank {} of {}): {e:?}", dist.rank, dist.world_size))
        })?;
        Ok(NcclComm { comm, ordinal, _context: ctx })
    }

    /// Averages a contiguous CUDA f32 tensor over ranks, in place, queued on the default stream.
    pub fn all_reduce_mean_in_place(&self, t: &mut Tensor) -> Result<(), DistError> {
        if t.kind() != tch::Kind::Float || !t.is_contiguous() || t.device() != tch::Device::Cuda(self.ordinal) {
            return Err(DistError::Mismatch(format!(
                "NCCL buckets must be contiguous f32 on cuda:{}, got {:?} on {:?}",
                self.ordinal,
                t.kind(),
                t.device()
            )));
        }
        let ptr = t.data_ptr();
        // SAFETY: the tensor's device memory, `numel` f32 values, reduced in place on the legacy default stream
        // (null), where libtorch's kernels for this tensor were queued.
        unsafe {
            result::all_reduce(
                ptr,
                ptr,
                t.numel(),
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclAvg,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| DistError::Nccl(format!("ncclAllReduce: {e:?}")))?;
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator this value owns, destroyed once (before `_context` is released).
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

/// `worker nccl-check`: what NCCL can do for this job, as a report (identical on every rank).
pub fn check(dist: &Dist) -> Result<String, DistError> {
    let mut report = match version() {
        Some(v) => format!("libnccl {}.{}.{} loaded\n", v / 10000, v / 100 % 100, v % 100),
        None => return Err(DistError::Nccl(missing_libraries().unwrap_or_else(|| "libnccl.so not found".into()))),
    };
    let id = shared_unique_id(dist)?;
    // Every rank's view of the id, compared: they must all hold rank 0's bytes.
    let digest = |b: &[u8]| b.iter().fold(0xcbf29ce484222325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100000001b3));
    let all = dist.all_gather_u64(&[digest(&id)]);
    if all.iter().any(|&d| d != all[0]) || id.iter().all(|&b| b == 0) {
        return Err(DistError::Nccl(format!("the unique id differs between ranks: {all:x?}")));
    }
    report +=
        &format!("unique id made by rank 0 reached all {} ranks over MPI (digest {:016x})\n", dist.world_size, all[0]);
    if !tch::Cuda::is_available() {
        let why = missing_libraries().unwrap_or_else(|| "libtorch sees no CUDA device".into());
        report += &format!("no GPU here ({why}): the NCCL all-reduce itself was not run\n");
        return Ok(report);
    }
    let ordinal = dist.local_rank % tch::Cuda::device_count().max(1) as usize;
    let comm = NcclComm::new(dist, ordinal)?;
    let mut t = Tensor::full([1 << 20], dist.rank as f64, (tch::Kind::Float, tch::Device::Cuda(ordinal)));
    comm.all_reduce_mean_in_place(&mut t)?;
    let want = (dist.world_size - 1) as f64 / 2.0;
    let got = t.mean(tch::Kind::Double).double_value(&[]);
    if (got - want).abs() > 1e-6 {
        return Err(DistError::Nccl(format!("all-reduce of the rank numbers gave {got}, expected {want}")));
    }
    report +=
        &format!("NCCL all-reduce (average) of 4 MiB on cuda:{ordinal} across {} ranks: correct\n", dist.world_size);
    Ok(report)
}
