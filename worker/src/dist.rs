//! Data-parallel communication between ranks: MPI for the process group (a singleton world of one when
//! started without mpirun), the broadcast of rank 0's initial trainable variables, and the bucketed gradient
//! all-reduce.
//!
//! Gradients of the trainable groups live in flat f32 buckets of about `bucket_bytes` each (whole tensors,
//! in a fixed order; each gradient is a view into its bucket, as PyTorch DDP's `gradient_as_bucket_view`), and
//! each bucket is reduced in place with one collective call and averaged: a few large messages instead of one
//! per tensor, and no copies. The buckets are allocated once and reused every step. Frozen encoders have no gradients and are never communicated. This is the CPU path (MPI); the
//! CUDA path (NCCL through cudarc) reduces the same buckets on the device.

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

/// This process's place in the job.
pub struct Dist {
    // Finalises MPI when dropped.
    _universe: Universe,
    world: SimpleCommunicator,
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
        let (rank, world_size) = (world.rank() as usize, world.size() as usize);
        // Ranks sharing a host: MPI's shared-memory split, which needs no launcher-specific variable.
        let local = world.split_shared(rank as i32);
        let local_rank = local.rank() as usize;
        let open_mpi = mpi::environment::library_version().is_ok_and(|v| v.contains("Open MPI"));
        Ok(Dist { _universe: universe, world, rank, world_size, local_rank, open_mpi })
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

    /// Rank 0's bytes on every rank (`bytes` must have the same length everywhere).
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) {
        if self.world_size > 1 {
            self.world.process_at_rank(0).broadcast_into(bytes);
        }
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
fn f32_slice(t: &mut Tensor) -> &mut [f32] {
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
    fn all_reduce_sum_in_place(&self, t: &mut Tensor, scratch: &mut Vec<f32>) {
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

/// Where each tensor lives in the buckets.
#[derive(Debug, Clone, PartialEq)]
struct Member {
    tensor: usize,
    offset: i64,
    numel: i64,
}

/// Flat f32 buckets for a fixed list of variables (the trainable ones, in a fixed order). Their gradients are
/// made views into the buckets ([`Buckets::attach_grads`], as PyTorch DDP's `gradient_as_bucket_view`):
/// backward accumulates straight into the buckets, which are reduced in place, with no packing or unpacking.
pub struct Buckets {
    members: Vec<Vec<Member>>,
    buffers: Vec<Tensor>,
    shapes: Vec<Vec<i64>>,
    scratch: Vec<f32>,
    /// Set for buckets on a GPU: reduced with NCCL instead of MPI.
    nccl: Option<crate::nccl::NcclComm>,
}

impl Buckets {
    /// Variables are packed whole, in order, into buckets of at least one variable and about `bucket_bytes`.
    pub fn new(vars: &[Tensor], bucket_bytes: usize) -> Buckets {
        let per_bucket = (bucket_bytes / 4).max(1) as i64;
        let mut members: Vec<Vec<Member>> = Vec::new();
        let mut filled = per_bucket;
        for (i, t) in vars.iter().enumerate() {
            let numel = t.numel() as i64;
            if filled + numel > per_bucket && filled > 0 {
                members.push(Vec::new());
                filled = 0;
            }
            members.last_mut().expect("a bucket").push(Member { tensor: i, offset: filled, numel });
            filled += numel;
        }
        let device = vars.first().map_or(tch::Device::Cpu, Tensor::device);
        let buffers = members
            .iter()
            .map(|m| Tensor::zeros([m.iter().map(|x| x.numel).sum::<i64>()], (Kind::Float, device)))
            .collect();
        Buckets { members, buffers, shapes: vars.iter().map(Tensor::size).collect(), scratch: Vec::new(), nccl: None }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Bytes communicated per reduction.
    pub fn bytes(&self) -> usize {
        self.buffers.iter().map(|t| t.numel() * 4).sum()
    }

    fn check(&self, vars: &[Tensor]) -> Result<(), DistError> {
        if vars.len() != self.shapes.len() || vars.iter().zip(&self.shapes).any(|(t, s)| &t.size() != s) {
            return Err(DistError::Mismatch("the variables differ from those the buckets were made for".into()));
        }
        Ok(())
    }

    fn view(&self, bucket: usize, m: &Member) -> Tensor {
        self.buffers[bucket].narrow(0, m.offset, m.numel).view(self.shapes[m.tensor].as_slice())
    }

    /// Makes each variable's gradient a view of its place in the buckets, zeroed. From then on, zero the
    /// gradients with [`Buckets::zero_grads`] (an optimizer's own zero_grad would detach them).
    pub fn attach_grads(&mut self, vars: &[Tensor]) -> Result<(), DistError> {
        self.check(vars)?;
        // Give every variable a gradient tensor: a backward pass of zero.
        let zero = vars
            .iter()
            .map(|v| v.sum(Kind::Float) * 0.0)
            .fold(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)), |a, b| a + b);
        zero.backward();
        for (b, members) in self.members.iter().enumerate() {
            for m in members {
                let mut grad = vars[m.tensor].grad();
                let view = self.view(b, m);
                grad.set_data(&view);
                if vars[m.tensor].grad().data_ptr() != view.data_ptr() {
                    return Err(DistError::Mismatch(format!(
                        "variable {} did not take a bucket view as its gradient",
                        m.tensor
                    )));
                }
            }
        }
        self.zero_grads();
        Ok(())
    }

    /// The buckets themselves (every attached gradient), e.g. for clipping by global norm.
    pub fn buffers_mut(&mut self) -> &mut [Tensor] {
        &mut self.buffers
    }

    pub fn zero_grads(&mut self) {
        for b in &mut self.buffers {
            let _ = b.zero_();
        }
    }

    /// Reduces GPU buckets with this communicator (MPI cannot read device memory).
    pub fn use_nccl(&mut self, comm: crate::nccl::NcclComm) {
        self.nccl = Some(comm);
    }

    /// Averages the attached gradients over ranks, bucket by bucket, in place: NCCL for GPU buckets, MPI for
    /// CPU ones.
    pub fn all_reduce_mean(&mut self, dist: &Dist) -> Result<(), DistError> {
        if dist.world_size == 1 {
            return Ok(());
        }
        if let Some(nccl) = &self.nccl {
            for b in &mut self.buffers {
                nccl.all_reduce_mean_in_place(b)?;
            }
            return Ok(());
        }
        if self.buffers.first().is_some_and(|b| b.device().is_cuda()) {
            return Err(DistError::Nccl("GPU buckets need an NCCL communicator (Buckets::use_nccl)".into()));
        }
        let scale = 1.0 / dist.world_size as f64;
        for b in &mut self.buffers {
            dist.all_reduce_sum_in_place(b, &mut self.scratch);
            let _ = b.g_mul_scalar_(scale);
        }
        Ok(())
    }

    /// Multiplies the attached gradients by `factor` (e.g. 1 / accumulation steps), in the buckets.
    pub fn scale(&mut self, factor: f64) {
        for b in &mut self.buffers {
            let _ = b.g_mul_scalar_(factor);
        }
    }

    /// Sets every rank's variables to rank 0's (the initial trainable variables), through the buckets.
    pub fn broadcast_from_root(&mut self, dist: &Dist, vars: &mut [Tensor]) -> Result<(), DistError> {
        self.check(vars)?;
        if dist.world_size == 1 {
            return Ok(());
        }
        tch::no_grad(|| {
            for b in 0..self.buffers.len() {
                for m in &self.members[b] {
                    self.view(b, m).copy_(&vars[m.tensor]);
                }
                // MPI moves host memory: GPU buckets go through a host copy (once, at the start).
                let mut host = self.buffers[b].to_device(tch::Device::Cpu);
                dist.world.process_at_rank(0).broadcast_into(f32_slice(&mut host));
                self.buffers[b].copy_(&host);
                for m in &self.members[b] {
                    vars[m.tensor].copy_(&self.view(b, m));
                }
            }
        });
        self.zero_grads();
        Ok(())
    }
}

/// Figures of `worker bench-allreduce`.
#[derive(Debug, Clone)]
pub struct AllReduceFigures {
    pub bytes: usize,
    pub buckets: usize,
    /// GB/s of algorithm bandwidth (bytes reduced per second), ours and one plain MPI call.
    pub ours: f64,
    pub plain: f64,
    /// Largest deviation of a reduced value from the exact mean.
    pub max_error: f64,
}

/// Reduces `tensors` (random sizes like a model's, about `bytes` in all) `iters` times per round with our
/// buckets and with one plain MPI all-reduce of the same bytes, interleaved over `rounds` (medians), checking
/// each result against the exact mean.
pub fn bench_all_reduce(
    dist: &Dist,
    bytes: usize,
    bucket_bytes: usize,
    iters: usize,
    rounds: usize,
) -> Result<AllReduceFigures, DistError> {
    // Parameter-like sizes: a mix of matrices and vectors, the same on every rank.
    let mut sizes = Vec::new();
    let (mut total, mut k) = (0usize, 0u64);
    while total < bytes / 4 {
        k += 1;
        let n = if k % 3 == 0 { 512 } else { 256 * (1 + (k * 7919 % 61) as usize) * 8 };
        let n = n.min(bytes / 4 - total).max(1);
        sizes.push(n as i64);
        total += n;
    }
    let value = |i: usize, rank: usize| (rank * 1000 + i) as f64;
    let vars: Vec<Tensor> =
        sizes.iter().map(|&n| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true)).collect();
    let mut buckets = Buckets::new(&vars, bucket_bytes);
    buckets.attach_grads(&vars)?;
    let send = vec![1.0f32; total];
    let mut recv = vec![0.0f32; total];
    let mean_rank = (dist.world_size - 1) as f64 / 2.0;
    let (mut ours, mut plain, mut max_error) = (Vec::new(), Vec::new(), 0.0f64);
    for _ in 0..rounds.max(1) {
        let mut elapsed = 0.0;
        for _ in 0..iters {
            for (i, v) in vars.iter().enumerate() {
                let _ = v.grad().fill_(value(i, dist.rank));
            }
            dist.barrier();
            let start = std::time::Instant::now();
            buckets.all_reduce_mean(dist)?;
            elapsed += start.elapsed().as_secs_f64();
        }
        ours.push(elapsed / iters as f64);
        for (i, v) in vars.iter().enumerate() {
            let want = mean_rank * 1000.0 + i as f64;
            max_error = max_error.max((v.grad() - want).abs().max().double_value(&[]));
        }
        let mut elapsed = 0.0;
        for _ in 0..iters {
            dist.barrier();
            let start = std::time::Instant::now();
            dist.all_reduce_sum_f32(&send, &mut recv);
            elapsed += start.elapsed().as_secs_f64();
        }
        plain.push(elapsed / iters as f64);
    }
    let median = |mut x: Vec<f64>| {
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let gbs = |secs: f64| (total * 4) as f64 / secs / 1e9;
    // Every rank reports the slowest rank's times (rank 0 prints).
    let mut t = [median(ours), median(plain), max_error];
    let mut worst = t;
    dist.world.all_reduce_into(&t[..], &mut worst[..], SystemOperation::max());
    t = worst;
    Ok(AllReduceFigures {
        bytes: total * 4,
        buckets: buckets.len(),
        ours: gbs(t[0]),
        plain: gbs(t[1]),
        max_error: t[2],
    })
}
