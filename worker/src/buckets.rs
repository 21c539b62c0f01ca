//! The bucketed gradient all-reduce and the broadcast of rank 0's initial trainable variables.
//!
//! Gradients of the trainable groups live in flat f32 buckets of about `bucket_bytes` each (whole tensors,
//! in a fixed order; each gradient is a view into its bucket, as PyTorch DDP's `gradient_as_bucket_view`), and
//! each bucket is reduced in place with one collective call and averaged: a few large messages instead of one
//! per tensor, and no copies. The buckets are allocated once and reused every step. Frozen encoders have no
//! gradients and are never communicated. On the CPU the buckets are reduced with MPI ([`crate::dist`]); on a
//! GPU with NCCL through cudarc ([`crate::nccl`]), on the device.

use mpi::collective::SystemOperation;
use mpi::traits::*;
use tch::{Kind, Tensor};

use crate::dist::{Dist, DistError, f32_slice};
use crate::nccl::NcclComm;

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
    nccl: Option<NcclComm>,
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
    pub fn use_nccl(&mut self, comm: NcclComm) {
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
