//! Data-parallel communication between ranks: MPI for the process group (a singleton world of one when
//! started without mpirun) and the collectives the rest of the worker uses (the gradient buckets of
//! [`crate::buckets`], evaluation counts, gathers, barriers).

use std::sync::atomic::{AtomicBool, Ordering};

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("MPI could not be initialised (already initialised in this process?)")]
    Init,
    #[error("{0}")]
    Mismatch(String),
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// Set while MPI runs a world of more than one rank in this process: an error must then end every rank.
static DISTRIBUTED: AtomicBool = AtomicBool::new(false);

/// Ends every rank of the job (`MPI_Abort` with `code`) when this process is one of several ranks; returns
/// when it is not. A rank that simply returned its error would finalise MPI while its peers wait for it in a
/// collective, and the job would hang until someone killed it (a bare `mpirun` forever). Call it after the
/// error has been logged: the abort kills the other ranks at once.
pub fn abort_job_if_distributed(code: i32) {
    if DISTRIBUTED.load(Ordering::SeqCst) && mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
        mpi::topology::SimpleCommunicator::world().abort(code);
    }
}

/// Finalises MPI at the end of a run that succeeded (every rank gets there). A failed run must not: finalising
/// waits for every peer, and a peer may be waiting for this rank in a collective; it aborts instead
/// ([`abort_job_if_distributed`]). So MPI is not finalised when a [`Dist`] is dropped.
pub fn finalize() {
    if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
        // SAFETY: MPI is initialised and not finalised, and no communication is in flight after a run ends.
        unsafe { mpi::ffi::MPI_Finalize() };
    }
}

/// This process's place in the job.
pub struct Dist {
    pub(crate) world: SimpleCommunicator,
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this host (selects the GPU).
    pub local_rank: usize,
    open_mpi: bool,
}

impl Dist {
    /// Initialises MPI: under mpirun, the job's world; started alone, a world of one.
    pub fn init() -> Result<Dist, DistError> {
        let universe = mpi::initialize().ok_or(DistError::Init)?;
        let world = universe.world();
        // Finalised by [`finalize`], only after a run that succeeded, never by a drop on an error's way out.
        std::mem::forget::<Universe>(universe);
        let (rank, world_size) = (world.rank() as usize, world.size() as usize);
        // Ranks sharing a host: MPI's shared-memory split, which needs no launcher-specific variable.
        let local = world.split_shared(rank as i32);
        let local_rank = local.rank() as usize;
        let open_mpi = mpi::environment::library_version().is_ok_and(|v| v.contains("Open MPI"));
        DISTRIBUTED.store(world_size > 1, Ordering::SeqCst);
        Ok(Dist { world, rank, world_size, local_rank, open_mpi })
    }

    pub fn barrier(&self) {
        self.world.barrier();
    }

    /// Element-wise sum over ranks, in place.
    pub fn all_reduce_sum_f64(&self, values: &mut [f64]) {
        if self.world_size > 1 {
            let send = values.to_vec();
            self.world.all_reduce_into(&send[..], values, SystemOperation::sum());
        }
    }

    /// Element-wise maximum over ranks, in place.
    pub fn all_reduce_max_f64(&self, values: &mut [f64]) {
        if self.world_size > 1 {
            let send = values.to_vec();
            self.world.all_reduce_into(&send[..], values, SystemOperation::max());
        }
    }

    /// Rank 0's bytes on every rank (`bytes` must have the same length everywhere).
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) {
        if self.world_size > 1 {
            self.world.process_at_rank(0).broadcast_into(bytes);
        }
    }

    /// Rank 0's `bytes` on every rank, whatever their length (the other ranks' `bytes` are ignored).
    pub fn broadcast_any_length(&self, bytes: Vec<u8>) -> Vec<u8> {
        let mut len = (bytes.len() as u64).to_le_bytes();
        self.broadcast_bytes(&mut len);
        let mut out = if self.rank == 0 { bytes } else { vec![0u8; u64::from_le_bytes(len) as usize] };
        if !out.is_empty() {
            self.broadcast_bytes(&mut out);
        }
        out
    }

    /// How many ranks passed `failed = true` (every rank gets the count): a collective verdict, so that no
    /// rank goes on when another could not.
    pub fn count_failed(&self, failed: bool) -> usize {
        let mut n = [failed as u8 as f64];
        self.all_reduce_sum_f64(&mut n);
        n[0] as usize
    }

    /// Every rank's `values` (the same length everywhere), concatenated in rank order.
    pub fn all_gather_u64(&self, values: &[u64]) -> Vec<u64> {
        let mut all = vec![0u64; values.len() * self.world_size];
        self.world.all_gather_into(values, &mut all[..]);
        all
    }

    /// Every rank's bytes on rank 0, in rank order (`None` elsewhere).
    pub fn gather_bytes(&self, bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
        // An empty slice's pointer is dangling (address 1 for bytes), which Open MPI reads as MPI_IN_PLACE:
        // give it a real address.
        let storage = [0u8; 1];
        let bytes = if bytes.is_empty() { &storage[..0] } else { bytes };
        let lengths = self.all_gather_u64(&[bytes.len() as u64]);
        if self.world_size == 1 {
            return Some(vec![bytes.to_vec()]);
        }
        let root = self.world.process_at_rank(0);
        if self.rank != 0 {
            root.gather_varcount_into(bytes);
            return None;
        }
        let counts: Vec<i32> = lengths.iter().map(|&n| n as i32).collect();
        let displs: Vec<i32> = counts
            .iter()
            .scan(0, |acc, &n| {
                let d = *acc;
                *acc += n;
                Some(d)
            })
            .collect();
        let mut all = vec![0u8; lengths.iter().sum::<u64>() as usize];
        {
            let mut partition = mpi::datatype::PartitionMut::new(&mut all[..], counts, &displs[..]);
            root.gather_varcount_into_root(bytes, &mut partition);
        }
        Some(displs.iter().zip(&lengths).map(|(&d, &n)| all[d as usize..d as usize + n as usize].to_vec()).collect())
    }

    /// One f32 all-reduce (sum) of a contiguous buffer: the plain MPI call the buckets are measured against.
    pub fn all_reduce_sum_f32(&self, send: &[f32], recv: &mut [f32]) {
        self.world.all_reduce_into(send, recv, SystemOperation::sum());
    }
}

/// Raw view of a contiguous CPU f32 tensor.
pub(crate) fn f32_slice(t: &mut Tensor) -> &mut [f32] {
    assert!(t.kind() == Kind::Float && t.is_contiguous() && t.device() == tch::Device::Cpu);
    let n = t.numel();
    // SAFETY: the tensor is a contiguous CPU f32 buffer of n elements that we borrow mutably for the slice's
    // lifetime; libtorch does not touch it meanwhile.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) }
}

/// Open MPI's `MPI_IN_PLACE` (`(void *) 1` in its mpi.h); the `mpi` crate does not export the constant.
const OPEN_MPI_IN_PLACE: *const std::ffi::c_void = std::ptr::without_provenance(1);

impl Dist {
    /// Sum over ranks of a contiguous CPU f32 tensor, in place: no second buffer with Open MPI, a copy with
    /// other MPI libraries.
    pub(crate) fn all_reduce_sum_in_place(&self, t: &mut Tensor, scratch: &mut Vec<f32>) {
        let data = f32_slice(t);
        if self.open_mpi {
            use mpi::raw::AsRaw;
            // SAFETY: MPI_IN_PLACE with a valid buffer of `len` floats on every rank (same bucket layout).
            let rc = unsafe {
                mpi::ffi::MPI_Allreduce(
                    OPEN_MPI_IN_PLACE,
                    data.as_mut_ptr().cast(),
                    data.len() as i32,
                    mpi::ffi::RSMPI_FLOAT,
                    mpi::ffi::RSMPI_SUM,
                    self.world.as_raw(),
                )
            };
            assert_eq!(rc, 0, "MPI_Allreduce failed");
        } else {
            scratch.clear();
            scratch.extend_from_slice(data);
            self.world.all_reduce_into(&scratch[..], data, SystemOperation::sum());
        }
    }
}
