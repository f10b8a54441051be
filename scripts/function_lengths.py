#!/usr/bin/env python3
"""The longest functions of the workspace (approximate brace matching, tests and benches left out).

    python3 scripts/function_lengths.py . 12
"""
import re,sys,pathlib
root=pathlib.Path(sys.argv[1])
fn=re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)')
out=[]
for p in sorted(root.glob('crates/**/*.rs')):
    if '/tests/' in str(p) or '/benches/' in str(p): continue
    lines=p.read_text().splitlines()
    i=0
    while i<len(lines):
        m=fn.match(lines[i])
        if not m: i+=1; continue
        depth=0; started=False; j=i
        while j<len(lines):
            s=re.sub(r'"(\\.|[^"\\])*"|\'(\\.|[^\'\\])\'|//.*','',lines[j])
            for c in s:
                if c=='{': depth+=1; started=True
                elif c=='}': depth-=1
            if started and depth<=0: break
            if not started and s.rstrip().endswith(';'): break
            j+=1
        if started: out.append((j-i+1,str(p.relative_to(root)),m.group(7),i+1))
        i+=1
out.sort(reverse=True)
for o in out[:int(sys.argv[2]) if len(sys.argv)>2 else 10]: print(o)
print('functions',len(out),'over 100 lines',sum(o[0]>100 for o in out),'over 60',sum(o[0]>60 for o in out))
