//! AdamW against `torch.optim.AdamW` (decay and no-decay groups, a changing learning rate) step by step; the
//! learning-rate schedule's shape; clipping against `torch.nn.utils.clip_grad_norm_`'s rule.

use std::collections::BTreeMap;

use avexpr_worker::optim::{AdamW, AdamWConfig, clip_grad_norm, learning_rate};
use tch::{Device, Kind, Tensor};

#[test]
fn adamw_equals_torch_optim_adamw() {
    tch::manual_seed(3);
    let opts = (Kind::Float, Device::Cpu);
    let vars = vec![
        ("w".to_string(), Tensor::randn([5, 4], opts).set_requires_grad(true)),
        ("b".to_string(), Tensor::randn([4], opts).set_requires_grad(true)),
    ];
    let steps = 6;
    let lrs: Vec<f64> = (0..steps).map(|s| learning_rate(s, 3e-2, 2, steps, 0.1)).collect();
    let grads: Vec<Vec<Tensor>> =
        (0..steps).map(|_| vars.iter().map(|(_, v)| Tensor::randn(v.size(), opts)).collect()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut named: Vec<(String, Tensor)> = vars.iter().map(|(n, v)| (format!("init.{n}"), v.detach().copy())).collect();
    for (s, g) in grads.iter().enumerate() {
        for ((n, _), g) in vars.iter().zip(g) {
            named.push((format!("grad{s}.{n}"), g.copy()));
        }
    }
    let input = tmp.path().join("in.safetensors");
    Tensor::write_safetensors(&named, &input).unwrap();

    let cfg = AdamWConfig { lr: 3e-2, betas: [0.8, 0.99], eps: 1e-7, weight_decay: 0.1 };
    // `w` learns at half the rate, as a PyTorch parameter group with its own lr (weight decay scaled with it).
    let scale = |name: &str| if name == "w" { 0.5 } else { 1.0 };
    let mut opt = AdamW::new(cfg, &vars).with_lr_scale(scale);
    for (s, g) in grads.iter().enumerate() {
        for ((_, v), g) in vars.iter().zip(g) {
            let mut grad = v.grad();
            if grad.defined() {
                grad.copy_(g);
            } else {
                (v * g).sum(Kind::Float).backward();
            }
        }
        opt.step(lrs[s]);
    }
    let output = tmp.path().join("out.safetensors");
    let script = format!(
        "import torch\nfrom safetensors.torch import load_file, save_file\n\
         t = load_file('{i}')\nw = t['init.w'].clone().requires_grad_(True)\nb = t['init.b'].clone().requires_grad_(True)\n\
         opt = torch.optim.AdamW([{{'params': [w], 'weight_decay': 0.1, 'scale': 0.5}}, \
         {{'params': [b], 'weight_decay': 0.0, 'scale': 1.0}}], lr=3e-2, betas=(0.8, 0.99), eps=1e-7)\n\
         for s, lr in enumerate({lrs:?}):\n    w.grad = t[f'grad{{s}}.w']\n    b.grad = t[f'grad{{s}}.b']\n\
         \x20   for g in opt.param_groups: g['lr'] = lr * g['scale']\n    opt.step()\n\
         save_file({{'w': w.detach(), 'b': b.detach()}}, '{o}')\n",
        i = input.display(),
        o = output.display()
    );
    let python = std::env::var("AVEXPR_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want: BTreeMap<String, Tensor> = Tensor::read_safetensors(&output).unwrap().into_iter().collect();
    for (n, v) in &vars {
        let diff = (v - &want[n]).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{n}: differs from torch.optim.AdamW by {diff}");
        let moved = (v - named.iter().find(|(k, _)| k == &format!("init.{n}")).unwrap().1.shallow_clone())
            .abs()
            .max()
            .double_value(&[]);
        assert!(moved > 1e-3, "{n} moved");
    }

    // State round trip: a fresh optimizer with the saved state takes the same next step.
    let state = opt.state();
    let copies: Vec<(String, Tensor)> =
        vars.iter().map(|(n, v)| (n.clone(), v.detach().copy().set_requires_grad(true))).collect();
    for (_, c) in &copies {
        (c * 1.5).sum(Kind::Float).backward();
    }
    let mut restored = AdamW::new(cfg, &copies).with_lr_scale(scale);
    restored.load_state(&state, opt.step).unwrap();
    for (_, v) in &vars {
        let _ = v.grad().fill_(1.5);
    }
    opt.step(0.01);
    restored.step(0.01);
    for ((n, a), (_, b)) in vars.iter().zip(&copies) {
        assert!(a.allclose(b, 0.0, 0.0, false), "{n}: the restored optimizer took another step");
    }
}

#[test]
fn schedule_warms_up_then_decays_to_the_floor() {
    let lr = |s| learning_rate(s, 1.0, 10, 110, 0.1);
    assert!((lr(0) - 0.1).abs() < 1e-12 && (lr(9) - 1.0).abs() < 1e-12);
    assert!((lr(10) - 1.0).abs() < 1e-12);
    assert!((lr(60) - 0.55).abs() < 1e-12, "half way down the cosine: {}", lr(60));
    assert!((lr(110) - 0.1).abs() < 1e-12 && (lr(500) - 0.1).abs() < 1e-12);
    assert!((10..110).all(|s| lr(s + 1) <= lr(s)));
}

#[test]
fn clipping_scales_to_the_max_norm_only_when_above() {
    let mut buffers = vec![Tensor::from_slice(&[3.0f32, 0.0]), Tensor::from_slice(&[4.0f32])];
    assert!((clip_grad_norm(&mut buffers, 10.0) - 5.0).abs() < 1e-9);
    assert_eq!(buffers[1].double_value(&[0]), 4.0, "below the max: untouched");
    assert!((clip_grad_norm(&mut buffers, 1.0) - 5.0).abs() < 1e-9);
    let norm: f64 = buffers.iter().map(|b| b.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
}
