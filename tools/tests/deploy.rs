//! The deployment examples of `nyx check` (a Kubernetes Indexed Job, a
//! GitHub Actions matrix) parse as YAML, hand each shard its own `--shard
//! I/N` with N equal to the number of shards, merge the shards' JUnit
//! reports, and use only options that `nyx check` has.

use std::path::PathBuf;

use serde_yaml::Value;

/// The `nyx` binary.
fn nyx() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_nyx"))
}

fn load(rel: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[*k],
    })
}

/// Every `--option` of `nyx check` in `script` exists.
fn options_exist(script: &str) {
    let help = nyx().args(["check", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for word in script.split_whitespace() {
        if let Some(opt) = word.strip_prefix("--") {
            let opt = opt.split('=').next().unwrap();
            assert!(help.contains(&format!("--{opt}")), "nyx check has no --{opt}:\n{help}");
        }
    }
}

#[test]
fn kubernetes_indexed_job_runs_one_shard_per_index() {
    let job = load("deploy/kubernetes/check-job.yaml");
    assert_eq!(job["kind"].as_str(), Some("Job"));
    assert_eq!(get(&job, &["spec", "completionMode"]).as_str(), Some("Indexed"));
    let n = get(&job, &["spec", "completions"]).as_u64().expect("completions");
    assert_eq!(get(&job, &["spec", "parallelism"]).as_u64(), Some(n));
    let c = get(&job, &["spec", "template", "spec", "containers", "0"]);
    let shards = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("SHARDS"))
        .and_then(|e| e["value"].as_str())
        .expect("SHARDS");
    assert_eq!(shards.parse::<u64>().unwrap(), n, "SHARDS must equal completions");
    let script = c["args"][0].as_str().unwrap();
    assert!(
        script.contains("--shard \"${JOB_COMPLETION_INDEX}/${SHARDS}\""),
        "{script}"
    );
    assert!(script.contains("--junit \"/artifacts/"), "{script}");
    assert!(script.contains("--trace-dir \"/artifacts/"), "{script}");
    options_exist(script);
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert_eq!(mounts, ["/snapshots", "/artifacts"]);
    let volumes = get(&job, &["spec", "template", "spec", "volumes"])
        .as_sequence()
        .unwrap();
    assert_eq!(volumes.len(), 2);
}

#[test]
fn github_matrix_runs_every_shard_and_merges_the_reports() {
    let wf = load("deploy/github-actions/check-matrix.yml");
    let shards: Vec<u64> = get(&wf, &["jobs", "check", "strategy", "matrix", "shard"])
        .as_sequence()
        .expect("a matrix over shards")
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    let n = get(&wf, &["env", "SHARDS"]).as_u64().expect("SHARDS");
    assert_eq!(shards, (0..n).collect::<Vec<_>>(), "the matrix holds shards 0..SHARDS");
    let run_of = |job: &str| -> String {
        get(&wf, &["jobs", job, "steps"])
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|s| s["run"].as_str())
            .filter(|r| r.contains("nyx check"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let check = run_of("check");
    assert!(check.contains("--shard \"${{ matrix.shard }}/$SHARDS\""), "{check}");
    options_exist(&check);
    assert_eq!(get(&wf, &["jobs", "merge", "needs"]).as_str(), Some("check"));
    assert!(run_of("merge").contains("nyx check merge-junit shards/junit-*.xml > junit.xml"));
}
