#!/usr/bin/env python3
"""Code lines of a crate's sources: no tests, comments or blank lines.

Usage: agent-size.py [SRC_DIR]   (default: boot/src)

A line counts when it is not blank and not only a comment. Test code does not count:
`#[cfg(test)]` items (inline modules, and modules in their own files such as
`tests.rs`) are skipped.
"""
import os, re, sys

def test_modules(text):
    return set(re.findall(r'#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*mod\s+(\w+)\s*;', text))

def count(text):
    n = 0; depth = 0; skip = None; pending = False; block = False
    for line in text.split('\n'):
        s = line.strip()
        if block:
            if '*/' in s: block = False
            continue
        if s.startswith('/*'):
            block = '*/' not in s
            continue
        if skip is not None:
            depth += line.count('{') - line.count('}')
            if depth <= skip: skip = None
            continue
        if s == '#[cfg(test)]':
            pending = True; continue
        if pending:
            if s.startswith('#['): continue
            pending = False
            if s.endswith(';'): continue
            skip = depth
            depth += line.count('{') - line.count('}')
            if depth <= skip: skip = None
            continue
        depth += line.count('{') - line.count('}')
        if s and not s.startswith('//'):
            n += 1
    return n

def walk(path, rel, out):
    text = open(path).read()
    out.append((rel, count(text)))
    here = os.path.dirname(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    sub = here if stem in ('lib', 'main', 'mod') else os.path.join(here, stem)
    tests = test_modules(text)
    for m in re.findall(r'^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;', text, re.M):
        if m in tests: continue
        for cand in (os.path.join(sub, m + '.rs'), os.path.join(sub, m, 'mod.rs')):
            if os.path.exists(cand):
                walk(cand, os.path.relpath(cand, ROOT), out)
                break

ROOT = sys.argv[1] if len(sys.argv) > 1 else 'boot/src'
rows = []
for top in ('lib.rs', 'main.rs'):
    p = os.path.join(ROOT, top)
    if os.path.exists(p):
        walk(p, top, rows)
seen = {}
for rel, n in rows: seen[rel] = n
for rel in sorted(seen):
    print(f'{seen[rel]:6}  {rel}')
print(f'{sum(seen.values()):6}  total')
