//! bf16 mixed precision for the trainable part: `torch.autocast(device_type, dtype=torch.bfloat16)`.
//!
//! `tch::autocast` only switches CUDA autocast on, in its default dtype (f16, which needs loss scaling). The
//! dtype and the per-device switch are libtorch's own `at::autocast` functions; tch does not wrap them, so they
//! are bound here by their C++ symbols in `libtorch_cpu.so` (stable across torch 2.x, checked by the tests).
//! Under autocast, matmuls and convolutions run in bf16 on bf16 copies of the f32 weights, reductions, softmax
//! and losses stay in f32, and gradients reach the f32 variables: no master-weight copy or loss scaling needed.

use tch::Device;

// c10::DeviceType and c10::ScalarType are `enum class : int8_t`.
const DEVICE_CPU: i8 = 0;
const DEVICE_CUDA: i8 = 1;
const SCALAR_BFLOAT16: i8 = 15;

unsafe extern "C" {
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn set_autocast_enabled(device: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn is_autocast_enabled(device: i8) -> bool;
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn set_autocast_dtype(device: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn get_autocast_dtype(device: i8) -> i8;
}

/// Restores the previous autocast state when dropped (also when `f` panics).
struct Restore {
    device: i8,
    enabled: bool,
    dtype: i8,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: plain setters of libtorch's thread-local autocast state.
        unsafe {
            if torch_sys::at_autocast_decrement_nesting() == 0 {
                torch_sys::at_autocast_clear_cache();
            }
            set_autocast_enabled(self.device, self.enabled);
            set_autocast_dtype(self.device, self.dtype);
        }
    }
}

/// Runs `f` with bf16 autocast on `device`'s type when `enabled`, else plainly. Autocast state is per thread,
/// as in PyTorch; the variables stay f32 and their gradients are f32.
pub fn bf16<T>(device: Device, enabled: bool, f: impl FnOnce() -> T) -> T {
    if !enabled {
        return f();
    }
    let device = match device {
        Device::Cpu => DEVICE_CPU,
        Device::Cuda(_) => DEVICE_CUDA,
        // Other back-ends have no bf16 autocast here: full precision.
        _ => return f(),
    };
    // SAFETY: as above; the guard puts the previous state back.
    let _restore = unsafe {
        let restore = Restore { device, enabled: is_autocast_enabled(device), dtype: get_autocast_dtype(device) };
        set_autocast_dtype(device, SCALAR_BFLOAT16);
        set_autocast_enabled(device, true);
        torch_sys::at_autocast_increment_nesting();
        restore
    };
    f()
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    #[test]
    fn matmul_runs_in_bf16_inside_and_f32_outside() {
        let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
        let inside = super::bf16(Device::Cpu, true, || a.matmul(&b));
        assert_eq!(inside.kind(), Kind::BFloat16);
        assert_eq!(a.matmul(&b).kind(), Kind::Float, "state restored after the closure");
        assert_eq!(super::bf16(Device::Cpu, false, || a.matmul(&b)).kind(), Kind::Float);
        let exact = a.matmul(&b);
        let err = (inside.to_kind(Kind::Float) - &exact).abs().max().double_value(&[]);
        let scale = exact.abs().max().double_value(&[]);
        assert!(err <= 2e-2 * scale, "bf16 matmul off by {err} (scale {scale})");
        assert!(err > 0.0, "bf16 cannot be exact on random data: autocast did not run");
    }

    #[test]
    fn state_is_restored_after_a_panic() {
        let a = Tensor::randn([2, 2], (Kind::Float, Device::Cpu));
        let caught = std::panic::catch_unwind(|| super::bf16(Device::Cpu, true, || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }
}
