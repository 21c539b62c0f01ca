//! The job file's errors name the field the user wrote, as a dotted path into the YAML, and point at the
//! user's own line.

use avexpr_worker::job::JobConfig;

/// `configs/quickstart.yaml`'s path, and its text with `edit` applied to its YAML tree.
fn quickstart_with(edit: impl FnOnce(&mut serde_yaml::Value)) -> (std::path::PathBuf, String) {
    let quickstart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/quickstart.yaml");
    let mut job: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&quickstart).unwrap()).unwrap();
    edit(&mut job);
    (quickstart, serde_yaml::to_string(&job).unwrap())
}

/// `configs/quickstart.yaml` with `edit` applied: the error `JobConfig::from_file` gives, without the file's
/// path, and the file's text.
fn error_of(edit: impl FnOnce(&mut serde_yaml::Value)) -> (String, String) {
    let (_, text) = quickstart_with(edit);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("job.yaml");
    std::fs::write(&path, &text).unwrap();
    let e = JobConfig::from_file(&path).expect_err("the edited config was accepted").to_string();
    let prefix = format!("{}: ", path.display());
    (e.strip_prefix(&prefix).unwrap_or_else(|| panic!("the error does not start with the file: {e}")).into(), text)
}

/// The line that `... at line N column M` points at.
fn line_pointed_at<'a>(e: &str, text: &'a str) -> &'a str {
    let n: usize = e.split("at line ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).expect("a line number");
    text.lines().nth(n - 1).unwrap()
}

#[test]
fn an_unreadable_job_file_is_named_without_a_field() {
    // It read `/nowhere/job.yaml: <file>: cannot read: ...`.
    let e = JobConfig::from_file(std::path::Path::new("/nowhere/job.yaml")).unwrap_err().to_string();
    assert!(e.starts_with("/nowhere/job.yaml: cannot read: "), "{e}");
}

#[test]
fn a_zero_micro_batch_is_reported_as_train_micro_batch() {
    // It was reported as `data.batch_size`, the loader's name for it, which no job file has.
    let (e, _) = error_of(|j| j["train"]["micro_batch"] = 0.into());
    assert_eq!(e, "train.micro_batch: must be positive");
}

#[test]
fn model_errors_name_the_field_once_and_point_at_the_users_line() {
    // The model section was written back to YAML and parsed again: the path was repeated and the line was
    // the rewritten section's.
    let (e, text) = error_of(|j| j["model"]["head"]["target"] = "middle".into());
    assert!(e.starts_with("model.head.target: unknown variant `middle`, expected `last` or `center`"), "{e}");
    assert!(line_pointed_at(&e, &text).trim_start().starts_with("target: middle"), "{e}");

    let (e, text) = error_of(|j| j["model"]["tcn"]["kernel"] = 3.into());
    assert!(e.starts_with("model.tcn.kernel: unknown field `kernel`, expected one of"), "{e}");
    assert!(line_pointed_at(&e, &text).trim_start().starts_with("kernel: 3"), "{e}");

    // Checks serde cannot make keep their names.
    let (e, _) = error_of(|j| j["model"]["fusion"]["heads"] = 3.into());
    assert_eq!(e, "model.fusion.heads: 3 must divide model.fusion.dim (64)");
}

#[test]
fn a_global_batch_that_the_world_cannot_split_names_the_file() {
    // The error was reported against a placeholder file, `<config>`.
    let quickstart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/quickstart.yaml");
    let job = JobConfig::from_file(&quickstart).unwrap();
    assert_eq!(job.accumulation(2).unwrap(), 1);
    let e = job.accumulation(3).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: train.global_batch: 16 is not a multiple of train.micro_batch (8) x ranks (3): its 2 data slots \
             (global_batch / micro_batch) run on 1, 2 rank(s)",
            quickstart.display()
        )
    );
}

/// `configs/quickstart.yaml` with `edit` applied, parsed.
fn job_with(edit: impl FnOnce(&mut serde_yaml::Value)) -> JobConfig {
    let (path, text) = quickstart_with(edit);
    JobConfig::from_text(&text, &path).unwrap()
}

#[test]
fn a_resume_names_a_setting_left_at_its_default_as_such() {
    // Settings at their default are not saved with a checkpoint; a change to one read `"dinov2" -> null`.
    let clip = job_with(|_| {});
    let dinov2 = job_with(|j| {
        j["model"]["image_encoder"] = "dinov2".into();
        j["model"]["dinov2"] = serde_yaml::from_str("{checkpoint: /somewhere/dinov2-small}").unwrap();
    });
    assert_eq!(clip.changes_that_forbid_resuming(&dinov2), ["model.image_encoder: \"dinov2\" -> (default)"]);
    assert_eq!(dinov2.changes_that_forbid_resuming(&clip), ["model.image_encoder: (default) -> \"dinov2\""]);
    // The section one side omits is compared field by field: its checkpoint may move (the whole section read
    // as a change, `model.dinov2: {..} -> null`, refusing a resume that only named the default checkpoint)...
    let default_place = job_with(|j| j["model"]["image_encoder"] = "dinov2".into());
    assert_eq!(default_place.changes_that_forbid_resuming(&dinov2), Vec::<String>::new());
    // ... and its adaptation may not.
    let adapted = job_with(|j| {
        j["model"]["image_encoder"] = "dinov2".into();
        j["model"]["dinov2"] = serde_yaml::from_str("{checkpoint: /elsewhere, adapt: {mode: lora}}").unwrap();
    });
    let changes = dinov2.changes_that_forbid_resuming(&adapted);
    assert!(changes.iter().all(|c| c.starts_with("model.dinov2.adapt.")), "{changes:?}");
    assert!(changes.contains(&"model.dinov2.adapt.mode: \"lora\" -> (default)".to_string()), "{changes:?}");
}
