//! One writer per store on a real S3 server that ignores the create-only condition (Garage): two jobs racing for
//! a free lease may both think they took it, but only one passes the check that every checkpoint commit makes.

use std::time::Duration;

use avexpr_data::garage::{BUCKET, Garage};
use avexpr_worker::lease::Lease;

#[test]
fn of_two_jobs_racing_for_a_lease_on_garage_at_most_one_may_commit() {
    let garage = Garage::start();
    let ttl = Duration::from_secs(30);
    let mut both_acquired = 0;
    for round in 0..20 {
        let store = garage.store(&format!("s3://{BUCKET}/race-{round}"));
        let barrier = std::sync::Barrier::new(2);
        let leases: Vec<Option<Lease>> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        Lease::acquire(&store, "racing job", ttl).ok()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let held: Vec<&Lease> = leases.iter().flatten().collect();
        assert!(!held.is_empty(), "round {round}: neither job got the free lease");
        both_acquired += (held.len() == 2) as usize;
        let may_commit = held.iter().filter(|l| l.check().is_ok()).count();
        assert_eq!(may_commit, 1, "round {round}: {may_commit} jobs pass the check before a commit");
    }
    println!("both racers believed they acquired the lease in {both_acquired} of 20 rounds; one committed in each");
}
