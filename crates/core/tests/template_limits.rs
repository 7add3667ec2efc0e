//! Chat templates that build huge values fail with a clear error in bounded memory (issue 15,
//! `bitlora_core::template_limits`). One test in its own binary, so the process's peak RSS
//! (VmHWM, Linux) measures these renderings alone.

use bitlora_core::{ChatTemplate, Message};

fn template(source: &str) -> ChatTemplate {
    let json =
        serde_json::json!({ "chat_template": source, "bos_token": "<s>", "eos_token": "</s>" });
    ChatTemplate::from_tokenizer_config("tc.json", json.to_string().as_bytes())
        .unwrap()
        .unwrap()
}

fn hi() -> Vec<Message> {
    vec![Message {
        role: "user".into(),
        content: "hi".into(),
    }]
}

/// Peak resident memory of this process so far, in MiB (None off Linux).
fn peak_rss_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

#[test]
fn templates_that_build_huge_values_fail_in_bounded_memory() {
    let before = peak_rss_mib();
    // `set` inside a loop is scoped to one iteration in minijinja (as in Jinja2): this one is
    // harmless. The doublings below carry the string in a namespace or unroll the loop.
    let scoped =
        "{% set s = 'aaaaaaaa' %}{% for i in range(40) %}{% set s = s ~ s %}{% endfor %}{{ s }}";
    assert_eq!(template(scoped).render(&hi(), false).unwrap(), "aaaaaaaa");
    let unrolled = format!(
        "{{% set s = 'aaaaaaaa' %}}{}{{{{ s }}}}",
        "{% set s = s ~ s %}".repeat(40)
    );
    let unrolled_plus = unrolled.replace('~', "+");
    let attacks: [(&str, &str); 18] = [
        ("40 string doublings, unrolled (900 bytes)", &unrolled),
        ("the same with +", &unrolled_plus),
        (
            "doubling in a namespace",
            "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        ),
        ("string repetition", "{{ 'a' * 10**12 }}"),
        (
            "repetition under minijinja's 100 MB cap",
            "{{ 'a' * 99999999 }}",
        ),
        (
            "constants folded at compile time",
            "{{ (('a' * 99999999) ~ ('a' * 99999999)) ~ (('a' * 99999999) ~ ('a' * 99999999)) }}",
        ),
        (
            "a repetition by a variable",
            "{% set n = 99999999 %}{{ 'a' * n }}",
        ),
        (
            "join of a huge lazy list",
            "{% set n = 10**12 %}{{ (['aaaaaaaaaaaaaaaa'] * n)|join }}",
        ),
        (
            "join of range(100000) many times",
            "{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ range(100000)|join(',') %}{% endfor %}",
        ),
        (
            "replace with an empty pattern",
            "{% set n = 100000 %}{% set s = 'a' * n %}{{ s|replace('', s) }}",
        ),
        ("indent by a huge width", "{{ 'a\nb'|indent(10**11) }}"),
        (
            "format with a huge width",
            "{{ '%99999999999s'|format('x') }}",
        ),
        (
            "captured output doubling",
            "{% set ns = namespace(s='abcd') %}{% for i in range(40) %}{% set t %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = t %}{% endfor %}",
        ),
        (
            "raw text in a capture loop",
            "{% set t %}{% for i in range(100000) %}{% for j in range(9) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}{% endset %}{{ t|length }}",
        ),
        (
            "a list of huge slices",
            "{% set n = 20000000 %}{% set s = 'a' * n %}{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + [s[i:]] %}{% endfor %}{{ ns.l|length }}",
        ),
        (
            "a list printed after doubling by +",
            "{% set ns = namespace(l=['aaaaaaaa']) %}{% for i in range(50) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l }}",
        ),
        (
            "list stringified by a filter",
            "{% set n = 10**10 %}{{ (['aaaaaaaaaaaaaaaa'] * n)|upper }}",
        ),
        (
            "a containment test on a huge list",
            "{% set n = 10**10 %}{{ 'b' in (['aaaaaaaaaaaaaaaa'] * n)|string }}",
        ),
    ];
    for (what, source) in attacks {
        let start = std::time::Instant::now();
        // Refused when the template is loaded (a constant too large to fold) or rendered.
        let json = serde_json::json!({ "chat_template": source });
        let e = ChatTemplate::from_tokenizer_config("tc.json", json.to_string().as_bytes())
            .and_then(|t| t.unwrap().render(&hi(), false))
            .expect_err(what)
            .to_string();
        println!(
            "{what}: {:.2} s, peak RSS {:?} MiB: {e}",
            start.elapsed().as_secs_f64(),
            peak_rss_mib()
        );
        assert!(e.starts_with("tc.json: chat_template:"), "{what}: {e}");
        assert!(
            e.contains("MiB of text") || e.contains("folds into more than") || e.contains("fuel"),
            "{what}: {e}"
        );
    }
    // A nested value too deep to print or copy.
    let e = template("{% set ns = namespace(x=1) %}{% for i in range(100) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}")
        .render(&hi(), false)
        .unwrap_err()
        .to_string();
    println!("nesting: {e}");
    assert!(e.contains("nested more than 32"), "{e}");

    if let (Some(b), Some(a)) = (before, peak_rss_mib()) {
        println!("peak RSS: {b} MiB before, {a} MiB after the templates above");
        assert!(a < b + 100, "peak RSS grew from {b} to {a} MiB");
    }

    // Real templates still render, and a long conversation fits its budget: a ChatML template
    // building its text with + over 200 turns of 5 KB each (1 MB).
    let chatml = template(
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    );
    let long: Vec<Message> = (0..200)
        .map(|i| Message {
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: "x".repeat(5000),
        })
        .collect();
    let text = chatml.render(&long, true).unwrap();
    assert_eq!(
        text.len(),
        200 * (5000 + "<|im_start|>user\n<|im_end|>\n".len())
            + 200 / 2 * 5
            + "<|im_start|>assistant\n".len()
    );
    let ns = template(
        "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = ns.sys + m.content + '\n' %}{% endif %}{% endfor %}{{ bos_token }}{{ ns.sys|trim }}{% for m in messages|rejectattr('role', 'equalto', 'system') %}{{ '[' ~ m.role|upper ~ '] ' ~ m.content|trim }}{% if not loop.last %}{{ '\n' }}{% endif %}{% endfor %}",
    );
    let msgs = vec![
        Message {
            role: "system".into(),
            content: "be brief".into(),
        },
        Message {
            role: "user".into(),
            content: " hi ".into(),
        },
        Message {
            role: "assistant".into(),
            content: "hello".into(),
        },
    ];
    assert_eq!(
        ns.render(&msgs, false).unwrap(),
        "<s>be brief[USER] hi\n[ASSISTANT] hello"
    );
}
