//! Bounded memory for untrusted chat templates (issue 15).
//!
//! A chat template comes with a model, so it is untrusted input, and it reaches `generate
//! --chat`, chat-format training data and the page's Chat box. minijinja's fuel bounds the
//! instructions a rendering runs, not the bytes they build: `{% set s = s ~ s %}` forty times
//! is 120 instructions and 8 TB; `[s] * 10**12 | join` is one filter. minijinja 2.24 has no byte
//! limit of its own (it caps `range` at 100,000 items and string repetition at 100 MB, both
//! far above what a chat prompt needs), and neither its operators nor its output buffers can be
//! hooked. So each rendering gets a byte budget, and every place a template can copy or build
//! text is charged against it *before* the copy is made:
//!
//! - operators `~`, `+`, `*` and `in`: the compiled instructions are rewritten (minijinja's
//!   `unstable_machinery`, version pinned in Cargo.toml) so that a check runs first. It reads
//!   both operands, which lie on top of the VM stack: `Swap, CallFunction(LHS, 1), Swap,
//!   CallFunction(RHS_*, 1)` records the left one, leaves both where they were, and charges
//!   what the operator will build (`~`: the text of both; `+`: the sum of two strings or one
//!   slot per item of two lists; `*`: `len x n`). The operator itself is minijinja's own.
//!   Jump targets are renumbered for the inserted instructions;
//! - output, including output captured by `{% set %}...{% endset %}`, macros and call blocks:
//!   the formatter charges every printed value, an inserted check charges each raw text piece;
//! - slicing: the slice made is charged (inserted after the `Slice` instruction);
//! - every builtin filter is replaced by a wrapper that charges the text of arguments it turns
//!   into strings, a filter's own growth where it has one (`replace`, `join`'s separator,
//!   `indent`'s width, `format`'s widths), then the result; filters called by name from `map`,
//!   `select`... go through the same wrappers. Tests that turn arguments into strings are
//!   wrapped the same way; `debug()` (a dump of every variable) is removed.
//!
//! minijinja also folds constant expressions while compiling (`('a' * 99999999) ~ ...` is built
//! before anything runs, nested folds double each level): [`check_constants`] bounds them on
//! the parsed template first and refuses one over [`MAX_CONSTANT`] bytes.
//!
//! The budget is cumulative (nothing is refunded when a value is dropped), so what a rendering
//! allocates in all is at most the budget plus a constant per instruction run (at most
//! [`CHAT_TEMPLATE_FUEL`](crate::tokenizer::CHAT_TEMPLATE_FUEL)). The size of a value is an upper bound on its printed text:
//! a string's bytes; for a list or map, 16 bytes per item plus 6 per byte of the strings in it
//! (repr quoting and escapes), walked no deeper than [`MAX_DEPTH`] levels (deeper values are
//! refused: printing or dropping them recurses once per level). Walking a value is itself
//! charged (16 bytes per item), so the time spent checking is bounded by the budget too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use minijinja::machinery::{Instruction, Instructions};
use minijinja::value::{Rest, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};

/// Budget of one rendering: this much plus [`BUDGET_PER_INPUT_BYTE`] per byte of the messages
/// and tokens given to it. Real templates charge a few times the conversation's size (each
/// `+` in `'<|im_start|>' + role + '\n' + content` copies the prefix built so far).
pub const BUDGET_BASE: usize = 32 << 20;
/// See [`BUDGET_BASE`].
pub const BUDGET_PER_INPUT_BYTE: usize = 16;
/// Nesting of lists and maps a template may print or copy.
pub const MAX_DEPTH: usize = 32;

// Names of the inserted checks. Not identifiers, so a template cannot define, shadow or call
// them (`{% set ·concat = ... %}` does not parse).
const LHS: &str = "·lhs";
const RHS_CONCAT: &str = "·rhs~";
const RHS_ADD: &str = "·rhs+";
const RHS_MUL: &str = "·rhs*";
const RHS_IN: &str = "·rhs-in";
const CHARGE_BYTES: &str = "·charge-bytes";
const CHARGE_TOP: &str = "·charge-top";

/// Largest constant the compiler may fold (a chat template's literals are a few KB).
pub const MAX_CONSTANT: usize = 1 << 20;

/// Refuses a template whose constant expressions would fold (at compile time, before any
/// budget applies) into a value over [`MAX_CONSTANT`] bytes. Walks minijinja's parsed AST as
/// JSON (its `unstable_machinery_serde` form), so every statement kind is searched.
pub(crate) fn check_constants(source: &str) -> Result<(), minijinja::Error> {
    let ws = minijinja::machinery::WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    let ast = minijinja::machinery::parse(source, "chat", Default::default(), ws)?;
    let json = serde_json::to_value(&ast).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("template AST: {e}"))
    })?;
    check_node(&json)
}

fn check_node(j: &serde_json::Value) -> Result<(), minijinja::Error> {
    if j.get("expr").is_some()
        && let Some(b) = const_size(j)
        && b > MAX_CONSTANT
    {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "a constant expression folds into more than {} MiB",
                MAX_CONSTANT >> 20
            ),
        ));
    }
    match j {
        serde_json::Value::Array(items) => items.iter().try_for_each(check_node),
        serde_json::Value::Object(map) => map.values().try_for_each(check_node),
        _ => Ok(()),
    }
}

/// `(node, fields)` of an expression: `{"expr": kind, "inner": [fields, span]}`.
fn expr_parts(j: &serde_json::Value) -> Option<(&str, &serde_json::Value)> {
    Some((j.get("expr")?.as_str()?, j.get("inner")?.get(0)?))
}

/// Upper bound on the bytes of the value a constant expression folds into; None when it is
/// not constant (minijinja then compiles its parts, which are checked on their own).
fn const_size(j: &serde_json::Value) -> Option<usize> {
    let (kind, f) = expr_parts(j)?;
    match kind {
        "Const" => Some(match &f["value"] {
            serde_json::Value::String(s) => s.len(),
            other => other.to_string().len() + 16,
        }),
        "BinOp" => {
            let (l, r) = (const_size(&f["left"])?, const_size(&f["right"])?);
            match f["op"].as_str()? {
                "Concat" | "Add" => Some(l.saturating_add(r)),
                "Mul" => {
                    let n = const_number(&f["left"])
                        .or_else(|| const_number(&f["right"]))
                        .unwrap_or(0.0);
                    let n = if n.is_finite() && n > 0.0 {
                        n.min(usize::MAX as f64) as usize
                    } else {
                        0
                    };
                    Some(l.max(r).saturating_mul(n.max(1)))
                }
                _ => Some(l.max(r).max(24)),
            }
        }
        "UnaryOp" | "Compare" => Some(24),
        "List" | "Map" => Some(
            j["inner"][0]
                .as_object()?
                .values()
                .filter_map(|v| v.as_array())
                .flatten()
                .map(|x| const_size(x).unwrap_or(0) + 16)
                .fold(0usize, usize::saturating_add),
        ),
        _ => None,
    }
}

/// The number a constant arithmetic expression evaluates to (as f64, enough for a bound).
fn const_number(j: &serde_json::Value) -> Option<f64> {
    let (kind, f) = expr_parts(j)?;
    match kind {
        "Const" => f["value"].as_f64(),
        "UnaryOp" => Some(-const_number(&f["expr"])?),
        "BinOp" => {
            let (l, r) = (const_number(&f["left"])?, const_number(&f["right"])?);
            Some(match f["op"].as_str()? {
                "Add" => l + r,
                "Sub" => l - r,
                "Mul" => l * r,
                "Div" | "FloorDiv" => l / r,
                "Pow" => l.powf(r),
                _ => l.abs().max(r.abs()),
            })
        }
        _ => None,
    }
}

/// The bytes one rendering may still build, and the left operand of the operator being
/// checked.
pub(crate) struct Meter {
    budget: usize,
    left: AtomicUsize,
    lhs: Mutex<Value>,
}

impl Meter {
    pub(crate) fn new(budget: usize) -> Arc<Meter> {
        Arc::new(Meter {
            budget,
            left: AtomicUsize::new(budget),
            lhs: Mutex::new(Value::UNDEFINED),
        })
    }

    fn charge(&self, bytes: usize) -> Result<(), minijinja::Error> {
        let mut left = self.left.load(Ordering::Relaxed);
        loop {
            if bytes > left {
                self.left.store(0, Ordering::Relaxed);
                return Err(self.exceeded());
            }
            match self.left.compare_exchange(
                left,
                left - bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => left = now,
            }
        }
    }

    fn exceeded(&self) -> minijinja::Error {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "the template builds more than {} MiB of text for this conversation (a chat \
                 template needs a few times the conversation's size; this one copies strings \
                 or lists in a loop)",
                self.budget >> 20
            ),
        )
    }

    /// Upper bound on the bytes of `v`'s printed text (see the module doc); charges the walk
    /// and fails once it passes what is left of the budget.
    fn text_size(&self, v: &Value) -> Result<usize, minijinja::Error> {
        if let Some(s) = v.as_str() {
            return Ok(s.len());
        }
        let cap = self.left.load(Ordering::Relaxed);
        let mut walk = Walk {
            size: 0,
            nodes: 0,
            cap,
        };
        let r = walk.value(v, 0);
        self.charge(walk.nodes.saturating_mul(16))?;
        match r {
            Ok(()) => Ok(walk.size),
            Err(Stop::Big) => Err(self.exceeded()),
            Err(Stop::Deep) => Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("a value is nested more than {MAX_DEPTH} lists or maps deep"),
            )),
        }
    }

    /// Charges the text of `v` unless it is a string (strings are passed by reference).
    fn charge_stringified(&self, v: &Value) -> Result<(), minijinja::Error> {
        if v.as_str().is_none() {
            let n = self.text_size(v)?;
            self.charge(n)?;
        }
        Ok(())
    }

    fn charge_value(&self, v: &Value) -> Result<(), minijinja::Error> {
        let n = self.text_size(v)?;
        self.charge(n)
    }
}

enum Stop {
    Big,
    Deep,
}

struct Walk {
    size: usize,
    nodes: usize,
    cap: usize,
}

impl Walk {
    fn add(&mut self, n: usize) -> Result<(), Stop> {
        self.size = self.size.saturating_add(n);
        if self.size > self.cap {
            return Err(Stop::Big);
        }
        Ok(())
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Stop> {
        self.nodes += 1;
        self.add(16)?;
        match v.kind() {
            ValueKind::String => self.add(v.as_str().map_or(0, str::len).saturating_mul(6)),
            ValueKind::Bytes => self.add(v.as_bytes().map_or(0, <[u8]>::len).saturating_mul(6)),
            ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
                if depth >= MAX_DEPTH {
                    return Err(Stop::Deep);
                }
                let is_map = v.kind() == ValueKind::Map;
                let Ok(items) = v.try_iter() else {
                    return Ok(());
                };
                for item in items {
                    self.value(&item, depth + 1)?;
                    if is_map && let Ok(x) = v.get_item(&item) {
                        self.value(&x, depth + 1)?;
                    }
                }
                Ok(())
            }
            // Numbers, booleans, none, undefined, and plain objects (loop, macros), which
            // print a short fixed text: the 16 above.
            _ => Ok(()),
        }
    }
}

/// Items of a list-like value, or 0 (strings, numbers).
fn items(v: &Value) -> usize {
    match v.kind() {
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => v.len().unwrap_or(0),
        _ => 0,
    }
}

fn str_len(v: &Value) -> usize {
    v.as_str().map_or(0, str::len)
}

/// What the operator about to run on `lhs` and `rhs` builds, in bytes.
fn operator_cost(
    meter: &Meter,
    op: &str,
    lhs: &Value,
    rhs: &Value,
) -> Result<usize, minijinja::Error> {
    let list_like = |v: &Value| matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable);
    Ok(match op {
        RHS_CONCAT => meter.text_size(lhs)?.saturating_add(meter.text_size(rhs)?),
        RHS_ADD if lhs.as_str().is_some() && rhs.as_str().is_some() => str_len(lhs) + str_len(rhs),
        RHS_ADD if list_like(lhs) && list_like(rhs) => (items(lhs) + items(rhs)).saturating_mul(16),
        RHS_MUL => {
            let (seq, n) = if lhs.is_number() {
                (rhs, lhs)
            } else {
                (lhs, rhs)
            };
            let n = n.as_usize().unwrap_or(0);
            if let Some(s) = seq.as_str() {
                s.len().saturating_mul(n)
            } else if list_like(seq) {
                items(seq).saturating_mul(n).saturating_mul(16)
            } else {
                0
            }
        }
        // `a in b`: b a string turns a into one; b a list is walked.
        RHS_IN if rhs.as_str().is_some() => {
            if lhs.as_str().is_some() {
                0
            } else {
                meter.text_size(lhs)?
            }
        }
        RHS_IN => items(rhs).saturating_mul(16),
        _ => 0,
    })
}

/// The builtin filters, by name (minijinja 2.24's list, `defaults.rs`), to wrap.
fn builtin_filters() -> Vec<(&'static str, Value)> {
    use minijinja::filters as f;
    vec![
        ("safe", Value::from_function(f::safe)),
        ("escape", Value::from_function(f::escape)),
        ("e", Value::from_function(f::escape)),
        ("lower", Value::from_function(f::lower)),
        ("upper", Value::from_function(f::upper)),
        ("title", Value::from_function(f::title)),
        ("capitalize", Value::from_function(f::capitalize)),
        ("replace", Value::from_function(f::replace)),
        ("length", Value::from_function(f::length)),
        ("count", Value::from_function(f::length)),
        ("dictsort", Value::from_function(f::dictsort)),
        ("items", Value::from_function(f::items)),
        ("reverse", Value::from_function(f::reverse)),
        ("trim", Value::from_function(f::trim)),
        ("join", Value::from_function(f::join)),
        ("split", Value::from_function(f::split)),
        ("lines", Value::from_function(f::lines)),
        ("default", Value::from_function(f::default)),
        ("d", Value::from_function(f::default)),
        ("round", Value::from_function(f::round)),
        ("abs", Value::from_function(f::abs)),
        ("int", Value::from_function(f::int)),
        ("float", Value::from_function(f::float)),
        ("attr", Value::from_function(f::attr)),
        ("first", Value::from_function(f::first)),
        ("last", Value::from_function(f::last)),
        ("min", Value::from_function(f::min)),
        ("max", Value::from_function(f::max)),
        ("sort", Value::from_function(f::sort)),
        ("list", Value::from_function(f::list)),
        ("string", Value::from_function(f::string)),
        ("bool", Value::from_function(f::bool)),
        ("batch", Value::from_function(f::batch)),
        ("slice", Value::from_function(f::slice)),
        ("sum", Value::from_function(f::sum)),
        ("indent", Value::from_function(f::indent)),
        ("select", Value::from_function(f::select)),
        ("reject", Value::from_function(f::reject)),
        ("selectattr", Value::from_function(f::selectattr)),
        ("rejectattr", Value::from_function(f::rejectattr)),
        ("map", Value::from_function(f::map)),
        ("groupby", Value::from_function(f::groupby)),
        ("unique", Value::from_function(f::unique)),
        ("chain", Value::from_function(f::chain)),
        ("zip", Value::from_function(f::zip)),
        ("pprint", Value::from_function(f::pprint)),
        ("format", Value::from_function(f::format)),
    ]
}

/// Filters that return a number, a bool or one of their arguments' items: nothing to charge.
const SCALAR_FILTERS: [&str; 15] = [
    "length", "count", "first", "last", "default", "d", "attr", "abs", "round", "int", "float",
    "bool", "min", "max", "safe",
];

/// Filters that turn their (non-string) arguments into text.
const STRINGIFYING_FILTERS: [&str; 15] = [
    "lower",
    "upper",
    "title",
    "capitalize",
    "replace",
    "trim",
    "join",
    "split",
    "lines",
    "indent",
    "safe",
    "escape",
    "e",
    "string",
    "format",
];

/// A filter's own growth beyond its arguments' text.
fn filter_growth(name: &str, args: &[Value]) -> usize {
    let arg = |i: usize| args.get(i).cloned().unwrap_or(Value::UNDEFINED);
    match name {
        // Each match of `from` becomes `to`; an empty `from` matches between all characters.
        "replace" => {
            let (s, from, to) = (str_len(&arg(0)), str_len(&arg(1)), str_len(&arg(2)));
            (s / from.max(1) + 1).saturating_mul(to)
        }
        "join" => items(&arg(0)).saturating_mul(str_len(&arg(1))),
        // The width (a number of spaces or a string) on every line.
        "indent" => {
            let lines = arg(0).as_str().map_or(1, |s| s.lines().count() + 1);
            let width = arg(1).as_usize().unwrap_or_else(|| str_len(&arg(1)));
            lines.saturating_mul(width)
        }
        // Widths and precisions (`%100000000s`): every number in the format string.
        "format" => arg(0).as_str().map_or(0, |f| {
            f.split(|c: char| !c.is_ascii_digit())
                .filter_map(|d| {
                    d.parse::<usize>()
                        .ok()
                        .or((!d.is_empty()).then_some(usize::MAX))
                })
                .fold(0usize, usize::saturating_add)
        }),
        _ => 0,
    }
}

/// Installs the checks into `env`: operator and charge functions, wrapped filters and tests,
/// the charging formatter. `meter` is this rendering's.
pub(crate) fn install(env: &mut Environment<'_>, meter: &Arc<Meter>) {
    let m = meter.clone();
    env.add_function(LHS, move |v: Value| -> Result<Value, minijinja::Error> {
        *m.lhs.lock().unwrap_or_else(|p| p.into_inner()) = v.clone();
        Ok(v)
    });
    for op in [RHS_CONCAT, RHS_ADD, RHS_MUL, RHS_IN] {
        let m = meter.clone();
        env.add_function(op, move |rhs: Value| -> Result<Value, minijinja::Error> {
            let lhs = std::mem::replace(
                &mut *m.lhs.lock().unwrap_or_else(|p| p.into_inner()),
                Value::UNDEFINED,
            );
            let cost = operator_cost(&m, op, &lhs, &rhs)?;
            m.charge(cost)?;
            Ok(rhs)
        });
    }
    let m = meter.clone();
    env.add_function(
        CHARGE_BYTES,
        move |n: usize| -> Result<Value, minijinja::Error> {
            m.charge(n)?;
            Ok(Value::UNDEFINED)
        },
    );
    let m = meter.clone();
    env.add_function(
        CHARGE_TOP,
        move |v: Value| -> Result<Value, minijinja::Error> {
            m.charge_value(&v)?;
            Ok(v)
        },
    );
    for (name, orig) in builtin_filters() {
        let m = meter.clone();
        env.add_filter(name, move |state: &State, args: Rest<Value>| {
            if STRINGIFYING_FILTERS.contains(&name) {
                for a in args.iter() {
                    m.charge_stringified(a)?;
                }
            }
            m.charge(filter_growth(name, &args))?;
            // Debug printing indents every item by up to 4 spaces per level.
            if name == "pprint"
                && let Some(v) = args.first()
            {
                let n = m.text_size(v)?;
                m.charge(n.saturating_mul(4 * MAX_DEPTH / 6 + 1))?;
            }
            let out = orig.call(state, &args)?;
            if !SCALAR_FILTERS.contains(&name) {
                m.charge_value(&out)?;
            }
            Ok(out)
        });
    }
    // Tests that turn an argument into a string; the rest compare or look at kinds.
    use minijinja::tests as t;
    let tests: [(&str, Value); 7] = [
        ("lower", Value::from_function(t::is_lower)),
        ("upper", Value::from_function(t::is_upper)),
        ("startingwith", Value::from_function(t::is_startingwith)),
        ("endingwith", Value::from_function(t::is_endingwith)),
        ("in", Value::from_function(t::is_in)),
        ("filter", Value::from_function(t::is_filter)),
        ("test", Value::from_function(t::is_test)),
    ];
    for (name, orig) in tests {
        let m = meter.clone();
        env.add_test(name, move |state: &State, args: Rest<Value>| {
            for a in args.iter() {
                m.charge_stringified(a)?;
            }
            if name == "in" {
                m.charge(args.get(1).map_or(0, items).saturating_mul(16))?;
            }
            orig.call(state, &args).map(|v| v.is_true())
        });
    }
    // A dump of the whole state, cycles included: not something a chat prompt needs.
    env.remove_global("debug");
    let m = meter.clone();
    env.set_formatter(move |out, state, value| {
        m.charge_value(value)?;
        minijinja::escape_formatter(out, state, value)
    });
}

/// `instrs` with the checks inserted (see the module doc); jump targets renumbered.
pub(crate) fn metered<'s>(instrs: &Instructions<'s>) -> Instructions<'s> {
    let n = instrs.len() as u32;
    // Where each old instruction starts in the new list (its inserted checks first).
    let mut start = Vec::with_capacity(n as usize + 1);
    let mut out: Vec<(Instruction<'s>, u32)> = Vec::with_capacity(n as usize * 2);
    for pc in 0..n {
        let Some(instr) = instrs.get(pc) else { break };
        start.push(out.len() as u32);
        let check2 = |op: &'static str, out: &mut Vec<(Instruction<'s>, u32)>| {
            out.push((Instruction::Swap, pc));
            out.push((Instruction::CallFunction(LHS, Some(1)), pc));
            out.push((Instruction::Swap, pc));
            out.push((Instruction::CallFunction(op, Some(1)), pc));
        };
        match instr {
            Instruction::StringConcat => check2(RHS_CONCAT, &mut out),
            Instruction::Add => check2(RHS_ADD, &mut out),
            Instruction::Mul => check2(RHS_MUL, &mut out),
            Instruction::In => check2(RHS_IN, &mut out),
            Instruction::EmitRaw(s) => {
                out.push((Instruction::LoadConst(Value::from(s.len())), pc));
                out.push((Instruction::CallFunction(CHARGE_BYTES, Some(1)), pc));
                out.push((Instruction::DiscardTop, pc));
            }
            _ => {}
        }
        out.push((instr.clone(), pc));
        if let Instruction::Slice = instr {
            out.push((Instruction::CallFunction(CHARGE_TOP, Some(1)), pc));
        }
    }
    start.push(out.len() as u32);
    let to = |t: u32| start.get(t as usize).copied().unwrap_or(t);
    let mut rv = Instructions::new(instrs.name(), instrs.source());
    for (instr, pc) in out {
        let instr = match instr {
            Instruction::Jump(t) => Instruction::Jump(to(t)),
            Instruction::JumpIfFalse(t) => Instruction::JumpIfFalse(to(t)),
            Instruction::JumpIfFalseOrPop(t) => Instruction::JumpIfFalseOrPop(to(t)),
            Instruction::JumpIfTrueOrPop(t) => Instruction::JumpIfTrueOrPop(to(t)),
            Instruction::Iterate(t) => Instruction::Iterate(to(t)),
            Instruction::BuildMacro(name, t, flags) => Instruction::BuildMacro(name, to(t), flags),
            other => other,
        };
        match (instrs.get_span(pc), instrs.get_line(pc)) {
            (Some(span), _) => rv.add_with_span(instr, span),
            (None, Some(line)) => rv.add_with_line(instr, line.min(u16::MAX as usize) as u16),
            (None, None) => rv.add(instr),
        };
    }
    rv
}
