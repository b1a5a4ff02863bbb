use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "flows/t.yaml";

/// Strips one leading newline and the common indentation, so YAML can be indented in tests.
fn yaml(text: &str) -> String {
    let text = text.strip_prefix('\n').unwrap_or(text);
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    text.lines()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn parse(text: &str) -> Flow {
    match parse_flow(&yaml(text), Path::new(FILE)) {
        Ok(flow) => flow,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn pool(text: &str) -> PoolSpec {
    parse(text).pools.remove(0)
}

/// Parses `text`, expects an error at `line:column` on `key` whose message contains `fragment`.
#[track_caller]
fn fails(text: &str, line: usize, column: usize, key: &str, fragment: &str) -> FlowError {
    let e = match parse_flow(&yaml(text), Path::new(FILE)) {
        Ok(_) => panic!("parsed, but expected an error containing {fragment:?}"),
        Err(e) => e,
    };
    let message = e.to_string();
    assert_eq!(
        (e.line, e.column, e.key.as_str()),
        (line, column, key),
        "position of: {message}"
    );
    assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
    assert!(message.starts_with(FILE), "{message}");
    e
}

/// A one-pool flow with extra pool lines (indented like `cmd`); the pool starts on line 3.
fn one_pool(extra: &str) -> String {
    let mut text = String::from("name: f\nfunc:\n  - name: p\n    cmd: ./run\n");
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        text.push_str("    ");
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// Like `fails` for a `one_pool` document (the extra lines start on line 5, column 5).
#[track_caller]
fn pool_fails(extra: &str, line: usize, column: usize, key: &str, fragment: &str) -> FlowError {
    fails(&one_pool(extra), line, column, key, fragment)
}

// ---- the original format ----

#[test]
fn design_example_loads_with_documented_defaults() {
    let flow = parse(
        r#"
        name: pyex            # flow id
        priority: 0           # 0 = run on every node of the namespace, 1 = leader only
        func:
          - name: pyex        # pool name; suffix _async / _stream selects the mode
            image: pyex:0.1.0 # a bundle directory
            cmd: /usr/bin/python3 pyex.py 1
            num: 2            # workers (default 1)
            memory: 100       # MB (default 100)
            timeout: 10000    # ms per request (default 10000)
            sub:              # this pool receives the output of these pools
              - name: other
                filter: "tag:matched"   # substring; "no" = no filter (default)
                type: one
        "#,
    );
    assert_eq!(flow.name, "pyex");
    assert_eq!(flow.priority, 0);
    assert_eq!(flow.replicas, None);
    assert_eq!(flow.source.as_deref(), Some(Path::new(FILE)));
    let p = &flow.pools[0];
    assert_eq!(p.name, "pyex");
    assert_eq!(p.mode, Mode::Sync);
    assert_eq!(p.image.as_deref(), Some("pyex:0.1.0"));
    assert_eq!(p.argv, ["/usr/bin/python3", "pyex.py", "1"]);
    assert!(!p.shell);
    assert_eq!((p.min, p.max), (2, 2));
    assert_eq!(p.memory_bytes, 100 * 1024 * 1024);
    assert_eq!(p.timeout, Duration::from_secs(10));
    assert_eq!(
        p.subs,
        [Subscription {
            from: "other".into(),
            filter: Filter::Substring("tag:matched".into()),
            delivery: Delivery::One,
        }]
    );
    // Keys the original never had take their defaults.
    assert_eq!(p.concurrency, 1);
    assert_eq!(p.queue, 64);
    assert_eq!(p.line_max, 65_536);
    assert_eq!(p.restart, RestartSpec::default());
    assert_eq!(p.restart.backoff_initial, Duration::from_millis(100));
    assert_eq!(p.restart.backoff_max, Duration::from_secs(30));
    assert_eq!(p.restart.reset_after, Duration::from_secs(60));
    assert_eq!(p.restart.intensity, 5);
    assert_eq!(p.restart.period, Duration::from_secs(60));
    assert_eq!((p.cpu, p.pids, p.cache), (None, None, None));
    assert!(p.env.is_empty());
    assert_eq!((&p.user, &p.group, &p.cwd), (&None, &None, &None));
    assert_eq!(p.line, 4);
}

#[test]
fn minimal_pool_takes_every_default() {
    let p = pool(
        "
        name: f
        func:
          - name: p
            cmd: ./run
        ",
    );
    assert_eq!((p.min, p.max, p.concurrency, p.queue), (1, 1, 1, 64));
    assert_eq!(p.memory_bytes, 100 * 1024 * 1024);
    assert_eq!(p.timeout, Duration::from_millis(10_000));
    assert!(p.subs.is_empty());
    assert_eq!(p.image, None);
}

#[test]
fn null_values_count_as_absent() {
    let p = pool(
        "
        name: f
        func:
          - name: p
            cmd: ./run
            sub:
            num: ~
        ",
    );
    assert!(p.subs.is_empty());
    assert_eq!((p.min, p.max), (1, 1));
}

#[test]
fn async_suffix_selects_async_with_default_concurrency() {
    let p = pool("name: f\nfunc:\n  - name: slow_async\n    cmd: ./slow\n");
    assert_eq!(p.mode, Mode::Async);
    assert_eq!(p.concurrency, 16);
}

#[test]
fn stream_suffix_selects_stream_and_keeps_timeout() {
    let p = pool("name: f\nfunc:\n  - name: t_stream\n    cmd: ./t\n    timeout: 5000\n");
    assert_eq!(p.mode, Mode::Stream);
    assert_eq!(p.concurrency, 1);
    assert_eq!(p.timeout, Duration::from_secs(5));
}

#[test]
fn explicit_mode_without_suffix_and_matching_suffix() {
    assert_eq!(pool(&one_pool("mode: stream")).mode, Mode::Stream);
    assert_eq!(pool(&one_pool("mode: sync")).mode, Mode::Sync);
    let p = pool("name: f\nfunc:\n  - name: a_async\n    cmd: x\n    mode: async\n");
    assert_eq!(p.mode, Mode::Async);
}

#[test]
fn mode_contradicting_the_name_suffix() {
    let e = fails(
        "name: f\nfunc:\n  - name: a_async\n    cmd: x\n    mode: sync\n",
        5,
        11,
        "func[0].mode",
        "`mode: sync` contradicts the pool name, whose suffix `_async` selects async",
    );
    assert_eq!(
        e.kind,
        FlowErrorKind::ModeMismatch {
            mode: Mode::Sync,
            suffix: Mode::Async
        }
    );
}

#[test]
fn unknown_mode_value() {
    pool_fails("mode: batch", 5, 11, "func[0].mode", "unknown mode `batch`");
}

#[test]
fn subscription_types_map_old_and_new_names() {
    let text = yaml(
        "
        name: f
        func:
          - name: p
            cmd: x
            sub:
              - {name: a, type: one}
              - {name: a, type: sone}
              - {name: a, type: all}
              - {name: a, type: done}
              - {name: a, type: any}
              - {name: a, type: dall}
              - {name: a, type: every}
              - {name: a}
        ",
    );
    let p = parse_flow(&text, Path::new(FILE)).unwrap().pools.remove(0);
    let got: Vec<Delivery> = p.subs.iter().map(|s| s.delivery).collect();
    use Delivery::*;
    assert_eq!(got, [One, One, All, Any, Any, Every, Every, One]);
}

#[test]
fn unknown_subscription_type() {
    pool_fails(
        "sub:\n  - name: a\n    type: some",
        7,
        15,
        "func[0].sub[0].type",
        "unknown subscription type `some`",
    );
}

#[test]
fn filter_no_empty_or_absent_means_every_line() {
    let p = pool(&one_pool(
        "sub:\n  - {name: a, filter: \"no\"}\n  - {name: b, filter: no}\n  - {name: c, filter: ''}\n  - {name: d}",
    ));
    assert!(p.subs.iter().all(|s| s.filter == Filter::None));
}

#[test]
fn subscriptions_may_name_any_pool_even_itself() {
    let p = pool(&one_pool("sub:\n  - name: p\n  - name: in_another_flow"));
    assert_eq!(p.subs[0].from, "p");
    assert_eq!(p.subs[1].from, "in_another_flow");
}

#[test]
fn filters_match_substring_or_regex() {
    let p = pool(&one_pool(
        "sub:\n  - {name: a, filter: \"tag:valid\"}\n  - {name: a, regex: '^(warn|error):'}",
    ));
    let (sub, re) = (&p.subs[0].filter, &p.subs[1].filter);
    assert!(sub.matches("x tag:valid y"));
    assert!(!sub.matches("x tag:vali"));
    assert!(re.matches("error: disk"));
    assert!(!re.matches("info: error:"));
    assert!(Filter::None.matches("anything"));
    assert_eq!(
        re,
        &Filter::Regex(regex::Regex::new("^(warn|error):").unwrap())
    );
    assert_ne!(re, &Filter::Substring("^(warn|error):".into()));
    assert_eq!(re.describe(), "regex:^(warn|error):");
}

#[test]
fn bad_regex_points_at_the_pattern() {
    pool_fails(
        "sub:\n  - name: a\n    regex: '(open'",
        7,
        16,
        "func[0].sub[0].regex",
        "bad regex: unclosed group",
    );
}

#[test]
fn filter_and_regex_together() {
    pool_fails(
        "sub:\n  - name: a\n    filter: x\n    regex: y",
        8,
        16,
        "func[0].sub[0].regex",
        "either `filter` (a substring) or `regex`, not both",
    );
}

#[test]
fn sub_must_be_a_list_of_mappings() {
    pool_fails(
        "sub: other",
        5,
        10,
        "func[0].sub",
        "expected a list of subscriptions, found a string",
    );
    pool_fails(
        "sub:\n  - other",
        6,
        9,
        "func[0].sub[0]",
        "expected a mapping with `name`, `filter` and `type`, found a string",
    );
}

// ---- cmd ----

#[test]
fn cmd_is_split_like_a_shell_but_not_run_by_one() {
    let p = pool(concat!(
        "name: f\nfunc:\n  - name: p\n",
        r#"    cmd: python3 -c "print('a b')" 'x y' z\ w $HOME | cat"#,
    ));
    assert_eq!(
        p.argv,
        [
            "python3",
            "-c",
            "print('a b')",
            "x y",
            "z w",
            "$HOME",
            "|",
            "cat"
        ]
    );
    assert!(!p.shell);
}

#[test]
fn cmd_with_an_unclosed_quote() {
    let text = "name: f\nfunc:\n  - name: p\n    cmd: run 'oops\n";
    let e = parse_flow(text, Path::new(FILE)).unwrap_err();
    assert_eq!((e.line, e.column, e.key.as_str()), (4, 10, "func[0].cmd"));
    assert!(
        e.to_string().contains("cannot split `cmd` into arguments"),
        "{e}"
    );
}

#[test]
fn shell_true_runs_cmd_with_bin_sh() {
    let p = pool("name: f\nfunc:\n  - name: p\n    cmd: ls | wc -l > /tmp/n\n    shell: true\n");
    assert_eq!(p.argv, ["/bin/sh", "-c", "ls | wc -l > /tmp/n"]);
    assert!(p.shell);
}

#[test]
fn shell_true_refuses_a_list_cmd() {
    fails(
        "name: f\nfunc:\n  - name: p\n    shell: true\n    cmd: [a, b]\n",
        5,
        10,
        "func[0].cmd",
        "with `shell: true`, `cmd` is one string",
    );
}

#[test]
fn shell_must_be_a_boolean() {
    // YAML 1.2: `yes` is a string.
    pool_fails(
        "shell: yes",
        5,
        12,
        "func[0].shell",
        "expected `true` or `false`, found a string",
    );
}

#[test]
fn envelope_is_a_boolean_off_by_default_and_not_for_stream_pools() {
    assert!(!pool(&one_pool("num: 1")).envelope);
    assert!(pool(&one_pool("envelope: true")).envelope);
    pool_fails(
        "envelope: 1",
        5,
        15,
        "func[0].envelope",
        "expected `true` or `false`",
    );
    fails(
        "name: f\nfunc:\n  - name: t_stream\n    cmd: x\n    envelope: true\n",
        5,
        15,
        "func[0].envelope",
        "takes no requests to wrap",
    );
}

#[test]
fn list_cmd_is_the_argv_and_takes_numbers_as_written() {
    let p = pool("name: f\nfunc:\n  - name: p\n    cmd: [/usr/bin/python3, 'pyex.py', 1, 0.50]\n");
    assert_eq!(p.argv, ["/usr/bin/python3", "pyex.py", "1", "0.50"]);
}

#[test]
fn cmd_must_be_a_string_not_a_number() {
    fails(
        "name: f\nfunc:\n  - name: p\n    cmd: 123\n",
        4,
        10,
        "func[0].cmd",
        "expected a string, found an integer (quote it to use it as text)",
    );
    let p = pool("name: f\nfunc:\n  - name: p\n    cmd: '123'\n");
    assert_eq!(p.argv, ["123"]);
}

#[test]
fn empty_cmd() {
    fails(
        "name: f\nfunc:\n  - name: p\n    cmd: '  '\n",
        4,
        10,
        "func[0].cmd",
        "`cmd` names no program",
    );
    fails(
        "name: f\nfunc:\n  - name: p\n    cmd: []\n",
        4,
        10,
        "func[0].cmd",
        "`cmd` names no program",
    );
}

// ---- the richer keys ----

#[test]
fn every_richer_key() {
    let flow = parse(
        r#"
        name: rich
        replicas: 3
        func:
          - name: worker
            mode: async
            image: worker:1.0
            cmd: ./worker --fast
            min: 0
            max: 8
            concurrency: 4
            queue: 10
            timeout: 2500
            memory: 512
            cpu: 0.5
            pids: 100
            env: {LOG: debug, PORT: 8080, FLAG: true}
            user: nobody
            group: nogroup
            cwd: /srv/app
            line_max: 1024
            cache: {ttl_ms: 1000, size: 50}
            restart:
              backoff_initial_ms: 10
              backoff_max_ms: 1000
              reset_after_ms: 5000
              intensity: 0
              period_ms: 2000
        "#,
    );
    assert_eq!(flow.replicas, Some(3));
    let p = &flow.pools[0];
    assert_eq!(p.mode, Mode::Async);
    assert_eq!(p.argv, ["./worker", "--fast"]);
    assert_eq!((p.min, p.max, p.concurrency, p.queue), (0, 8, 4, 10));
    assert_eq!(p.timeout, Duration::from_millis(2500));
    assert_eq!(p.memory_bytes, 512 << 20);
    assert_eq!(p.cpu, Some(0.5));
    assert_eq!(p.pids, Some(100));
    let env: Vec<_> = p
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(env, [("FLAG", "true"), ("LOG", "debug"), ("PORT", "8080")]);
    assert_eq!(p.user.as_deref(), Some("nobody"));
    assert_eq!(p.group.as_deref(), Some("nogroup"));
    assert_eq!(p.cwd.as_deref(), Some(Path::new("/srv/app")));
    assert_eq!(p.line_max, 1024);
    assert_eq!(
        p.cache,
        Some(CacheSpec {
            ttl: Duration::from_secs(1),
            size: 50
        })
    );
    assert_eq!(
        p.restart,
        RestartSpec {
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            reset_after: Duration::from_secs(5),
            intensity: 0,
            period: Duration::from_secs(2),
        }
    );
}

#[test]
fn cpu_takes_integers_too() {
    assert_eq!(pool(&one_pool("cpu: 2")).cpu, Some(2.0));
}

#[test]
fn min_and_max_alone() {
    let p = pool(&one_pool("max: 4"));
    assert_eq!((p.min, p.max), (1, 4));
    let p = pool(&one_pool("min: 3"));
    assert_eq!((p.min, p.max), (3, 3));
    let p = pool(&one_pool("min: 0"));
    assert_eq!((p.min, p.max), (0, 1));
}

#[test]
fn restart_keys_override_one_by_one() {
    let p = pool(&one_pool("restart:\n  intensity: 2"));
    assert_eq!(p.restart.intensity, 2);
    assert_eq!(p.restart.backoff_max, RestartSpec::default().backoff_max);
}

#[test]
fn restart_backoff_initial_above_max() {
    pool_fails(
        "restart:\n  backoff_initial_ms: 500\n  backoff_max_ms: 100",
        7,
        23,
        "func[0].restart.backoff_max_ms",
        "`backoff_initial_ms` (500) is greater than `backoff_max_ms` (100)",
    );
    // Against the default cap, the error points at the initial delay.
    pool_fails(
        "restart:\n  backoff_initial_ms: 60000",
        6,
        27,
        "func[0].restart.backoff_initial_ms",
        "(60000) is greater than `backoff_max_ms` (30000)",
    );
}

#[test]
fn cache_needs_ttl_and_size() {
    pool_fails(
        "cache:\n  ttl_ms: 10",
        6,
        7,
        "func[0].cache.size",
        "missing required key `size`",
    );
    pool_fails(
        "cache: {size: 0, ttl_ms: 5}",
        5,
        19,
        "func[0].cache.size",
        "must be at least 1, got 0",
    );
}

#[test]
fn stream_pools_refuse_cache_sub_queue_and_concurrency() {
    let stream =
        |extra: &str| format!("name: f\nfunc:\n  - name: t_stream\n    cmd: x\n    {extra}\n");
    fails(
        &stream("cache: {ttl_ms: 1, size: 1}"),
        5,
        12,
        "func[0].cache",
        "a stream pool takes no input, so it has no replies to cache",
    );
    fails(
        &stream("sub: [{name: a}]"),
        5,
        10,
        "func[0].sub",
        "cannot subscribe to other pools",
    );
    fails(
        &stream("queue: 5"),
        5,
        12,
        "func[0].queue",
        "has no request queue",
    );
    fails(
        &stream("concurrency: 4"),
        5,
        18,
        "func[0].concurrency",
        "only async pools take more than one request per worker; this pool is stream",
    );
}

#[test]
fn concurrency_is_for_async_pools_only() {
    assert_eq!(pool(&one_pool("concurrency: 1")).concurrency, 1);
    pool_fails(
        "concurrency: 8",
        5,
        18,
        "func[0].concurrency",
        "only async pools take more than one request per worker; this pool is sync",
    );
}

#[test]
fn env_names_and_values() {
    pool_fails(
        "env:\n  GOOD: 1\n  2BAD: x",
        7,
        7,
        "func[0].env.2BAD",
        "`2BAD` is not a valid environment variable name",
    );
    pool_fails(
        "env:\n  EMPTY:",
        6,
        7,
        "func[0].env.EMPTY",
        "expected a string, found nothing (null)",
    );
    pool_fails(
        "env: [A=1]",
        5,
        10,
        "func[0].env",
        "expected a mapping of variable names to values",
    );
}

#[test]
fn user_group_and_cwd_are_checked() {
    pool_fails(
        "user: 'root; rm'",
        5,
        11,
        "func[0].user",
        "not a valid user name",
    );
    pool_fails(
        "group: 0",
        5,
        12,
        "func[0].group",
        "expected a string, found an integer",
    );
    pool_fails(
        "cwd: srv/app",
        5,
        10,
        "func[0].cwd",
        "`srv/app` is not an absolute path",
    );
}

#[test]
fn image_names_are_folder_names() {
    assert_eq!(
        pool(&one_pool("image: my-fn_v2:1.0.3")).image.as_deref(),
        Some("my-fn_v2:1.0.3")
    );
    pool_fails(
        "image: ../etc",
        5,
        12,
        "func[0].image",
        "not a valid image name",
    );
    pool_fails("image: a/b", 5, 12, "func[0].image", "no `/`, no `..`");
    pool_fails(
        "image: '.'",
        5,
        12,
        "func[0].image",
        "not a valid image name",
    );
}

#[test]
fn names_must_be_usable_in_urls_and_paths() {
    fails(
        "name: 'a b'\nfunc: [{name: p, cmd: x}]\n",
        1,
        7,
        "name",
        "`a b` is not a valid name",
    );
    fails(
        "name: f\nfunc:\n  - name: ../p\n    cmd: x\n",
        3,
        11,
        "func[0].name",
        "not a valid name",
    );
}

// ---- placement ----

#[test]
fn priority_and_replicas() {
    let flow = parse("name: f\npriority: 1\nfunc: [{name: p, cmd: x}]\n");
    assert_eq!((flow.priority, flow.replicas), (1, None));
    fails(
        "name: f\npriority: 1\nreplicas: 2\nfunc: [{name: p, cmd: x}]\n",
        3,
        11,
        "replicas",
        "`replicas` places the flow on that many nodes, `priority: 1` on the leader only",
    );
    fails(
        "name: f\npriority: 2\nfunc: [{name: p, cmd: x}]\n",
        2,
        11,
        "priority",
        "must be at most 1, got 2",
    );
    fails(
        "name: f\nreplicas: 0\nfunc: [{name: p, cmd: x}]\n",
        2,
        11,
        "replicas",
        "must be at least 1, got 0",
    );
}

// ---- the error cases, one by one ----

#[test]
fn yaml_syntax_error_carries_the_parser_position() {
    let e = fails(
        "name: f\nfunc:\n  - name: p\n   cmd: x\n",
        4,
        7,
        "",
        "YAML syntax error: while parsing a block collection, did not find expected '-' indicator",
    );
    assert!(matches!(e.kind, FlowErrorKind::Syntax(_)));
    fails("name: \"open\n", 1, 7, "", "YAML syntax error");
}

#[test]
fn unknown_key_at_the_key_with_a_suggestion() {
    let e = fails(
        "name: f\nfunc:\n  - name: p\n    cmd: x\n    nmae: q\n",
        5,
        5,
        "func[0].nmae",
        "unknown key (did you mean `name`? expected one of: name, mode, image, cmd,",
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{FILE}:5:5: func[0].nmae: unknown key (did you mean `name`? expected one of: {})",
            decode_pool_keys()
        )
    );
    fails(
        "name: f\ncolour: red\nfunc: [{name: p, cmd: x}]\n",
        2,
        1,
        "colour",
        "unknown key (expected one of: name, priority, replicas, func)",
    );
    fails(
        "name: f\nfunc: [{name: p, cmd: x, sub: [{name: a, kind: one}]}]\n",
        2,
        42,
        "func[0].sub[0].kind",
        "unknown key",
    );
}

fn decode_pool_keys() -> &'static str {
    "name, mode, image, cmd, shell, num, min, max, concurrency, queue, timeout, memory, cpu, \
     pids, env, user, group, cwd, sub, cache, restart, line_max, envelope"
}

#[test]
fn wrong_types() {
    let e = pool_fails(
        "num: two",
        5,
        10,
        "func[0].num",
        "expected an integer, found a string",
    );
    assert_eq!(
        e.kind,
        FlowErrorKind::WrongType {
            expected: "an integer",
            found: "a string",
            hint: ""
        }
    );
    pool_fails(
        "memory: 1.5",
        5,
        13,
        "func[0].memory",
        "expected an integer, found a number with a fraction",
    );
    pool_fails(
        "timeout: '100'",
        5,
        14,
        "func[0].timeout",
        "expected an integer, found a string",
    );
    pool_fails(
        "cpu: half",
        5,
        10,
        "func[0].cpu",
        "expected a number, found a string",
    );
    fails(
        "name: [f]\nfunc: [{name: p, cmd: x}]\n",
        1,
        7,
        "name",
        "expected a string, found a list",
    );
}

#[test]
fn missing_required_keys_point_at_the_mapping() {
    fails(
        "priority: 0\nfunc: [{name: p, cmd: x}]\n",
        1,
        1,
        "name",
        "missing required key `name`",
    );
    fails(
        "name: f\nfunc:\n  - cmd: x\n    num: 2\n",
        3,
        5,
        "func[0].name",
        "missing required key `name`",
    );
    fails(
        "name: f\nfunc:\n  - name: a\n    cmd: x\n  - name: b\n    num: 2\n",
        5,
        5,
        "func[1].cmd",
        "missing required key `cmd`",
    );
    pool_fails(
        "sub:\n  - filter: x",
        6,
        9,
        "func[0].sub[0].name",
        "missing required key `name`",
    );
}

#[test]
fn a_flow_needs_pools() {
    fails(
        "name: f\n",
        1,
        1,
        "func",
        "a flow needs at least one pool in `func`",
    );
    fails(
        "name: f\nfunc: []\n",
        2,
        7,
        "func",
        "a flow needs at least one pool in `func`",
    );
    fails(
        "name: f\nfunc:\n",
        1,
        1,
        "func",
        "a flow needs at least one pool in `func`",
    );
    fails(
        "name: f\nfunc: pyex\n",
        2,
        7,
        "func",
        "expected a list of pools, found a string",
    );
}

#[test]
fn duplicate_pool_names_point_at_the_second() {
    let e = fails(
        "name: f\nfunc:\n  - name: p\n    cmd: x\n  - name: q\n    cmd: x\n  - name: p\n    cmd: y\n",
        7,
        11,
        "func[2].name",
        "duplicate pool name `p` (first defined on line 3)",
    );
    assert_eq!(
        e.kind,
        FlowErrorKind::DuplicatePool {
            name: "p".into(),
            first_line: 3
        }
    );
}

#[test]
fn duplicate_yaml_keys() {
    pool_fails(
        "num: 1\nnum: 2",
        6,
        5,
        "func[0].num",
        "duplicate key (first given on line 5)",
    );
    fails(
        "name: a\nname: b\nfunc: [{name: p, cmd: x}]\n",
        2,
        1,
        "name",
        "duplicate key (first given on line 1)",
    );
}

#[test]
fn out_of_range_values() {
    pool_fails(
        "num: 0",
        5,
        10,
        "func[0].num",
        "out of range: must be at least 1, got 0",
    );
    pool_fails(
        "memory: 0",
        5,
        13,
        "func[0].memory",
        "must be at least 1, got 0",
    );
    pool_fails(
        "timeout: -5",
        5,
        14,
        "func[0].timeout",
        "must not be negative, got -5",
    );
    pool_fails(
        "timeout: 0",
        5,
        14,
        "func[0].timeout",
        "must be at least 1, got 0",
    );
    pool_fails("cpu: 0", 5, 10, "func[0].cpu", "cores must be more than 0");
    pool_fails(
        "cpu: .nan",
        5,
        10,
        "func[0].cpu",
        "cores must be more than 0",
    );
    pool_fails(
        "pids: 0",
        5,
        11,
        "func[0].pids",
        "must be at least 1, got 0",
    );
    pool_fails("max: 0", 5, 10, "func[0].max", "must be at least 1, got 0");
    pool_fails(
        "line_max: 99999999999",
        5,
        15,
        "func[0].line_max",
        "must be at most 67108864",
    );
    pool_fails(
        "num: 99999999999999999999",
        5,
        10,
        "func[0].num",
        "out of range",
    );
}

#[test]
fn num_together_with_min_or_max() {
    pool_fails(
        "num: 2\nmax: 3",
        6,
        10,
        "func[0].max",
        "`num` sets both `min` and `max`: give either `num` or `min`/`max`",
    );
    pool_fails("min: 1\nnum: 2", 5, 10, "func[0].min", "`num` sets both");
}

#[test]
fn min_greater_than_max() {
    pool_fails(
        "min: 5\nmax: 2",
        5,
        10,
        "func[0].min",
        "`min` (5) is greater than `max` (2)",
    );
}

// ---- document-level problems ----

#[test]
fn multiple_documents_are_refused() {
    let e = fails(
        "name: a\nfunc: [{name: p, cmd: x}]\n---\nname: b\n",
        3,
        1,
        "",
        "exactly one YAML document",
    );
    assert_eq!(e.kind, FlowErrorKind::MultipleDocuments);
    // One document with explicit markers is fine.
    parse("---\nname: a\nfunc: [{name: p, cmd: x}]\n...\n");
}

#[test]
fn empty_file_and_non_mapping_root() {
    let e = parse_flow("# nothing\n", Path::new(FILE)).unwrap_err();
    assert_eq!(
        (e.line, e.column, e.kind.clone()),
        (1, 1, FlowErrorKind::Empty)
    );
    fails(
        "- name: f\n",
        1,
        1,
        "",
        "expected a mapping (a flow has `name` and `func`), found a list",
    );
}

#[test]
fn tags_other_than_str_are_refused() {
    let p = pool("name: f\nfunc:\n  - name: p\n    cmd: !!str 42\n");
    assert_eq!(p.argv, ["42"]);
    fails(
        "name: f\nfunc:\n  - name: p\n    cmd: !python/object x\n",
        // yaml-rust2 marks a tagged scalar where its text starts, after the tag.
        4,
        25,
        "",
        "flow files do not support YAML tags",
    );
}

#[test]
fn anchors_and_aliases_are_resolved() {
    let flow = parse(
        "
        name: f
        func:
          - name: a
            cmd: ./a
            env: &common {REGION: eu, TIER: web}
          - name: b
            cmd: ./b
            env: *common
        ",
    );
    assert_eq!(flow.pools[0].env, flow.pools[1].env);
    assert_eq!(flow.pools[1].env["REGION"], "eu");
}

#[test]
fn error_display_format() {
    let e = FlowError {
        file: "flows/x.yaml".into(),
        line: 7,
        column: 5,
        key: "func[0].num".into(),
        kind: FlowErrorKind::Missing("cmd"),
        more: Vec::new(),
    };
    assert_eq!(
        e.to_string(),
        "flows/x.yaml:7:5: func[0].num: missing required key `cmd`"
    );
    let e = FlowError {
        key: String::new(),
        column: 0,
        ..e
    };
    assert_eq!(e.to_string(), "flows/x.yaml:7: missing required key `cmd`");
}

// ---- images ----

#[test]
fn check_images_asks_the_predicate() {
    let flow = parse(
        "
        name: f
        func:
          - name: a
            cmd: ./a
          - name: b
            cmd: ./b
            image: b:1.0
        ",
    );
    assert_eq!(check_images(&flow, &|name| name == "b:1.0"), Ok(()));
    let e = check_images(&flow, &|_| false).unwrap_err();
    assert_eq!((e.line, e.column, e.key.as_str()), (5, 0, "func[1].image"));
    assert_eq!(
        e.to_string(),
        "flows/t.yaml:5: func[1].image: image `b:1.0` is not installed on this node (see \
         `dropctl image import`)"
    );
}

// ---- examples/flows ----

fn example(name: &str, text: &str) -> Flow {
    match parse_flow(text, Path::new(name)) {
        Ok(flow) => flow,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn examples_parse() {
    let f = example(
        "pyecho.yaml",
        include_str!("../../../../examples/flows/pyecho.yaml"),
    );
    assert_eq!(f.pools[0].argv, ["/usr/bin/python3", "echo.py"]);
    assert_eq!(f.pools[0].image.as_deref(), Some("pyecho:0.1.0"));
    assert_eq!(f.pools[0].max, 2);

    let f = example(
        "users.yaml",
        include_str!("../../../../examples/flows/users.yaml"),
    );
    assert!(f.pools[0].envelope);
    assert_eq!(f.pools[0].image.as_deref(), Some("users:0.1.0"));

    let f = example(
        "bashecho.yaml",
        include_str!("../../../../examples/flows/bashecho.yaml"),
    );
    assert_eq!(f.pools[0].argv, ["/bin/bash", "echo.sh"]);
    assert!(!f.pools[0].shell);

    let f = example(
        "pingpong.yaml",
        include_str!("../../../../examples/flows/pingpong.yaml"),
    );
    assert_eq!(f.pools[0].subs[0].from, "pong");
    assert_eq!(f.pools[1].subs[0].from, "ping");
    assert!(f.pools.iter().all(|p| p.subs[0].delivery == Delivery::One));
    assert_eq!(f.pools[0].subs[0].filter, Filter::Substring("pong ".into()));
    assert_eq!(f.pools[1].subs[0].filter, Filter::Substring("ping ".into()));
    let lines: Vec<usize> = f.pools.iter().map(|p| p.line).collect();
    assert_eq!(lines, [8, 15]);

    let f = example(
        "pipeline.yaml",
        include_str!("../../../../examples/flows/pipeline.yaml"),
    );
    let filters: Vec<_> = f
        .pools
        .iter()
        .flat_map(|p| &p.subs)
        .map(|s| &s.filter)
        .collect();
    assert_eq!(
        filters,
        [
            &Filter::Substring("tag:valid".into()),
            &Filter::Substring("tag:invalid".into())
        ]
    );
    assert!(filters[0].matches("42 tag:valid"));
    assert!(!filters[1].matches("42 tag:valid"));

    let f = example(
        "asyncpy.yaml",
        include_str!("../../../../examples/flows/asyncpy.yaml"),
    );
    assert_eq!(
        (f.name.as_str(), f.pools[0].mode),
        ("slow_async", Mode::Async)
    );

    let f = example(
        "stream.yaml",
        include_str!("../../../../examples/flows/stream.yaml"),
    );
    assert_eq!(
        (f.name.as_str(), f.pools[0].mode),
        ("ticker_stream", Mode::Stream)
    );
    assert_eq!(f.pools[1].subs[0].delivery, Delivery::All);

    let f = example(
        "rustecho.yaml",
        include_str!("../../../../examples/flows/rustecho.yaml"),
    );
    assert_eq!(f.pools[0].argv, ["drop-echo-worker"]);
    assert_eq!((f.pools[0].min, f.pools[0].max), (2, 2));

    let f = example(
        "rich.yaml",
        include_str!("../../../../examples/flows/rich.yaml"),
    );
    assert_eq!(f.replicas, Some(2));
    assert_eq!(
        f.pools[0].argv,
        ["/usr/bin/python3", "enrich.py", "--workers", "8"]
    );
    assert_eq!(f.pools[1].argv[..2], ["/bin/sh", "-c"]);
    assert_eq!(f.pools[1].subs[0].delivery, Delivery::Every);
}

#[test]
fn summary_json_lists_pools_without_env_values() {
    let f = example(
        "rich.yaml",
        include_str!("../../../../examples/flows/rich.yaml"),
    );
    let json = f.to_summary_json();
    assert_eq!(json["name"], "rich");
    assert_eq!(json["replicas"], 2);
    let p = &json["pools"][0];
    assert_eq!(p["mode"], "async");
    assert_eq!(p["memory_mb"], 256);
    assert_eq!(p["timeout_ms"], 2000);
    assert_eq!(p["env"], serde_json::json!(["LOG_LEVEL", "PORT"]));
    assert_eq!(p["cache"]["ttl_ms"], 60000);
    assert_eq!(json["pools"][1]["subs"][0]["type"], "every");
    assert_eq!(
        json["pools"][1]["subs"][0]["filter"],
        "regex:^(warn|error):"
    );
    assert!(!json.to_string().contains("8080"));
}

#[test]
fn every_problem_of_a_flow_is_reported_at_once_in_file_order() {
    // A pool with a problem is left out whole, so the second `a` is no duplicate here.
    let text = "name: Bad Name\ncolour: red\nfunc:\n  - name: a\n    cmd: ./a\n    num: 0\n  - name: b\n    cmd: ./b\n    numm: 2\n    timeout_ms: x\n  - name: a\n    cmd: ./c\n";
    let e = match parse_flow(text, Path::new(FILE)) {
        Ok(_) => panic!("parsed a flow with five problems"),
        Err(e) => e,
    };
    let lines: Vec<String> = e.all().map(ToString::to_string).collect();
    let message = e.to_string();
    assert_eq!(lines.len(), 5, "{message}");
    // Each names file:line:column: key.
    let wanted = [
        (1, 7, "name"),
        (2, 1, "colour"),
        (6, 10, "func[0].num"),
        (9, 5, "func[1].numm"),
        (10, 5, "func[1].timeout_ms"),
    ];
    let found: Vec<(usize, usize, &str)> = e
        .all()
        .map(|e| (e.line, e.column, e.key.as_str()))
        .collect();
    assert_eq!(found, wanted, "{message}");
    for (line, (l, c, k)) in lines.iter().zip(wanted) {
        assert!(
            line.starts_with(&format!("{FILE}:{l}:{c}: {k}: ")),
            "{line}"
        );
    }
    assert_eq!(message.lines().count(), 5);
}
