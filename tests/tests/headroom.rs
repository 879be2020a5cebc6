//! Stack headroom of every XDP program we build, read from the objects the daemon loads.
//!
//! The verifier allows 512 bytes of stack for a whole BPF-to-BPF call chain (the sum of the
//! frames along it, `check_max_stack_depth`). A frame's depth is its deepest access below r10:
//! loads and stores through r10, or through a register set to r10 plus a constant (pointers to
//! the stack passed to helpers or to memcpy). The kernel rounds each frame up to 16 bytes when
//! the program is JIT-compiled and to 32 (at least 32) for the interpreter; we count the
//! interpreter's rule, the stricter one, so a figure here holds on any kernel configuration.
//!
//! Fails when a program leaves less than HEADROOM of the 512 bytes: a change that deepens the
//! stack is caught here, long before the verifier refuses to load the program.

use std::collections::BTreeMap;

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SymbolKind};

/// A function's place: (section index, offset in the section).
type At = (usize, u64);

const MAX_STACK: u32 = 512;
const HEADROOM: u32 = 96;

const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_ALU64: u8 = 0x07;
const BPF_JMP: u8 = 0x05;
const BPF_CALL: u8 = 0x80;
const BPF_PSEUDO_CALL: u8 = 1;
const OP_ADD: u8 = 0x00;
const OP_SUB: u8 = 0x10;
const OP_MOV: u8 = 0xb0;
const SRC_X: u8 = 0x08;
const BPF_LD_IMM64: u8 = 0x18;
const FP: u8 = 10;

/// One function of an object: where it is, its own frame, and the functions it calls.
struct Function {
    name: String,
    frame: u32,
    calls: Vec<At>,
}

/// The object's functions by (section, offset), and which of them are programs (not in .text).
fn functions(elf: &[u8]) -> (BTreeMap<At, Function>, Vec<At>) {
    let file = object::File::parse(elf).expect("parse ELF");
    let mut funcs = BTreeMap::new();
    let mut programs = Vec::new();
    for sym in file.symbols() {
        let Some(section_index) = sym.section_index() else {
            continue;
        };
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let section = file.section_by_index(section_index).expect("section");
        let data = section.data().expect("section data");
        let start = sym.address() - section.address();
        let code = &data[start as usize..(start + sym.size()) as usize];
        // Calls to other functions are relocations; with a section symbol the target is the
        // section's start plus (imm + 1) instructions, with a function symbol its address.
        let relocs: BTreeMap<u64, At> = section
            .relocations()
            .filter_map(|(off, r)| match r.target() {
                RelocationTarget::Symbol(i) => {
                    let s = file.symbol_by_index(i).ok()?;
                    Some((off, (s.section_index()?.0, s.address())))
                }
                _ => None,
            })
            .collect();
        let (frame, calls) = scan(code, start, section_index.0, &relocs);
        let name = sym.name().expect("symbol name").to_string();
        if section.name().ok() != Some(".text") {
            programs.push((section_index.0, start));
        }
        funcs.insert((section_index.0, start), Function { name, frame, calls });
    }
    (funcs, programs)
}

/// The deepest stack byte a function's instructions touch, and its BPF-to-BPF calls.
fn scan(code: &[u8], start: u64, section: usize, relocs: &BTreeMap<u64, At>) -> (u32, Vec<At>) {
    // Registers known to hold r10 + offset. Straight-line tracking: at a join it may keep a
    // stale offset, which can only make the figure deeper, never shallower.
    let mut fp_off: [Option<i64>; 11] = [None; 11];
    fp_off[FP as usize] = Some(0);
    let mut deepest = 0i64;
    let mut calls = Vec::new();
    let mut i = 0;
    while i + 8 <= code.len() {
        let insn = &code[i..i + 8];
        let (opcode, dst, src) = (insn[0], insn[1] & 0x0f, insn[1] >> 4);
        let off = i16::from_le_bytes([insn[2], insn[3]]) as i64;
        let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]) as i64;
        let class = opcode & 0x07;
        let at = start + i as u64;
        let mut touch = |base: u8, extra: i64| {
            if let Some(Some(o)) = fp_off.get(base as usize) {
                deepest = deepest.min(o + extra);
            }
        };
        match class {
            BPF_LDX => touch(src, off),
            BPF_ST | BPF_STX => touch(dst, off),
            _ => {}
        }
        if class == BPF_JMP && opcode & 0xf0 == BPF_CALL && src == BPF_PSEUDO_CALL {
            let target = match relocs.get(&at) {
                Some(&(sec, addr)) => (sec, (addr as i64 + (imm + 1) * 8) as u64),
                None => (section, (at as i64 + (imm + 1) * 8) as u64),
            };
            calls.push(target);
        }
        // What the instruction leaves in dst.
        let writes_dst = match class {
            BPF_LDX => true,
            BPF_ALU64 | 0x04 => true,
            _ => opcode == BPF_LD_IMM64,
        };
        if class == BPF_JMP && opcode & 0xf0 == BPF_CALL {
            // A call clobbers r0-r5 and leaves r6-r10 as they were.
            for r in &mut fp_off[..6] {
                *r = None;
            }
        } else if writes_dst && dst != FP {
            let op = opcode & 0xf0;
            fp_off[dst as usize] = match (class, op, opcode & SRC_X != 0) {
                (BPF_ALU64, OP_MOV, true) => fp_off[src as usize],
                (BPF_ALU64, OP_ADD, false) => fp_off[dst as usize].map(|o| o + imm),
                (BPF_ALU64, OP_SUB, false) => fp_off[dst as usize].map(|o| o - imm),
                _ => None,
            };
            if let Some(o) = fp_off[dst as usize] {
                deepest = deepest.min(o);
            }
        }
        // ld_imm64 takes two instruction slots.
        i += if opcode == BPF_LD_IMM64 { 16 } else { 8 };
    }
    ((-deepest) as u32, calls)
}

/// The interpreter's per-frame count in `check_max_stack_depth`: at least 32, in steps of 32.
fn interpreter(frame: u32) -> u32 {
    frame.max(1).div_ceil(32) * 32
}

/// The count for a JIT-compiled program: steps of 16.
fn jit(frame: u32) -> u32 {
    frame.div_ceil(16) * 16
}

/// The deepest call chain from `f` as `round` counts frames: its sum, and its frames.
fn chain(funcs: &BTreeMap<At, Function>, f: At, round: fn(u32) -> u32) -> (u32, Vec<&Function>) {
    let func = &funcs[&f];
    let (sum, mut frames) = func
        .calls
        .iter()
        .map(|&c| {
            assert!(
                funcs.contains_key(&c),
                "{} calls an unknown function at {c:?}",
                func.name
            );
            chain(funcs, c, round)
        })
        .max_by_key(|(sum, _)| *sum)
        .unwrap_or_default();
    frames.insert(0, func);
    (round(func.frame) + sum, frames)
}

/// A v0-mangled Rust name (`_R...<len><ident>`) by its last identifier, for reading.
fn short(name: &str) -> &str {
    let Some(rest) = name.strip_prefix("_R") else {
        return name;
    };
    let ident = rest.trim_end_matches(|c: char| !c.is_ascii_digit());
    let tail = &rest[ident.len()..];
    let digits = ident.len() - ident.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    match ident[ident.len() - digits..].parse::<usize>() {
        Ok(len) if len == tail.len() => tail,
        _ => name,
    }
}

#[test]
fn every_program_leaves_stack_headroom() {
    let objects = [
        ("balancer", lb_userspace::EBPF_OBJECT),
        ("decap", lb_userspace::DECAP_OBJECT),
        ("bench", lb_userspace::BENCH_OBJECT),
    ];
    let mut short_of_room = Vec::new();
    for (object, elf) in objects {
        let (funcs, programs) = functions(elf);
        assert!(!programs.is_empty(), "{object}: no programs found");
        let all: Vec<String> = funcs
            .values()
            .map(|f| format!("{} {}", short(&f.name), f.frame))
            .collect();
        println!("{object} frames: {}", all.join(", "));
        for p in programs {
            let (used, frames) = chain(&funcs, p, interpreter);
            let (jitted, _) = chain(&funcs, p, jit);
            let raw: u32 = frames.iter().map(|f| f.frame).sum();
            let free = MAX_STACK.saturating_sub(used);
            let list: Vec<String> = frames
                .iter()
                .map(|f| format!("{} {}", short(&f.name), f.frame))
                .collect();
            println!(
                "{}: {used} of {MAX_STACK} bytes ({free} free); deepest chain {} = {raw} bytes \
                 touched, {jitted} as counted when JIT-compiled",
                funcs[&p].name,
                list.join(" + ")
            );
            if free < HEADROOM {
                short_of_room.push(format!("{object}/{} ({free} free)", funcs[&p].name));
            }
        }
    }
    assert!(
        short_of_room.is_empty(),
        "less than {HEADROOM} bytes of stack free: {}",
        short_of_room.join(", ")
    );
}
