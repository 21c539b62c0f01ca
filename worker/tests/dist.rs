//! Gradients as bucket views: training through the buckets is exactly training without them, and the buckets
//! hold the gradients' values (so reducing them reduces the gradients).

use avexpr_worker::buckets::Buckets;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

fn model(vs: &nn::Path) -> nn::Sequential {
    nn::seq().add(nn::linear(vs / "a", 6, 16, Default::default())).add_fn(|x| x.gelu("none")).add(nn::linear(
        vs / "b",
        16,
        3,
        Default::default(),
    ))
}

#[test]
fn training_through_attached_buckets_equals_plain_training() {
    tch::manual_seed(7);
    let plain_vs = nn::VarStore::new(Device::Cpu);
    let plain = model(&plain_vs.root());
    let bucket_vs = nn::VarStore::new(Device::Cpu);
    let bucketed = model(&bucket_vs.root());
    tch::no_grad(|| {
        for (name, v) in bucket_vs.variables() {
            v.shallow_clone().copy_(&plain_vs.variables()[&name]);
        }
    });
    let mut names: Vec<String> = bucket_vs.variables().into_keys().collect();
    names.sort();
    let vars: Vec<Tensor> = names.iter().map(|n| bucket_vs.variables()[n].shallow_clone()).collect();
    // A bucket size that splits the variables over several buckets.
    let mut buckets = Buckets::new(&vars, 200);
    assert!(buckets.len() >= 3, "{} buckets", buckets.len());
    buckets.attach_grads(&vars).unwrap();

    let mut opt_plain = nn::AdamW::default().build(&plain_vs, 1e-2).unwrap();
    let mut opt_bucketed = nn::AdamW::default().build(&bucket_vs, 1e-2).unwrap();
    for step in 0..5 {
        let x = Tensor::randn([8, 6], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(3, [8], (Kind::Int64, Device::Cpu));
        opt_plain.zero_grad();
        plain.forward(&x).cross_entropy_for_logits(&y).backward();
        opt_plain.step();
        buckets.zero_grads();
        bucketed.forward(&x).cross_entropy_for_logits(&y).backward();
        // The gradient values are in the buckets: doubling the buckets doubles the gradients.
        let before = vars[0].grad().copy();
        buckets.scale(2.0);
        assert!(vars[0].grad().allclose(&(before * 2.0), 0.0, 0.0, false), "step {step}");
        buckets.scale(0.5);
        opt_bucketed.step();
        for (name, v) in &vars.iter().zip(&names).map(|(v, n)| (n, v)).collect::<Vec<_>>() {
            let want = &plain_vs.variables()[*name];
            assert!(v.allclose(want, 0.0, 0.0, false), "step {step}: {name} differs");
        }
    }
}
