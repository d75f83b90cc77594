import csv, collections, sys
def load(fn):
    rows=list(csv.reader(open(fn)))
    hi=[i for i,r in enumerate(rows) if 'Source' in r][0]
    h=rows[hi]; idx={k:i for i,k in enumerate(h)}
    out=[]
    for r in rows[hi+1:]:
        if len(r)<len(h): continue
        try: n=int(r[idx['Instructions Executed']] or 0)
        except: continue
        out.append((r[idx['Address']], r[idx['Source']], n, int(r[idx['Warp Stall Sampling (All Samples)']] or 0), r[idx['L1 Conflicts Shared N-Way']] if 'L1 Conflicts Shared N-Way' in idx else '', r[idx['L1 Wavefronts Shared Excessive']]))
    return out
for fn in sys.argv[1:]:
    d=load(fn)
    tot=sum(x[2] for x in d); samp=sum(x[3] for x in d)
    mix=collections.Counter(); st=collections.Counter()
    for a,s,n,sm,_,_ in d:
        op=s.split()[0] if s else '?'
        if op.startswith('@'): op=s.split()[1]
        op=op.split('.')[0]
        mix[op]+=n; st[op]+=sm
    print(fn, 'total inst', tot, 'samples', samp)
    for op,n in mix.most_common(25): print(f'   {op:10s} {n:12d} {100*n/tot:5.1f}%  stall-samples {100*st[op]/samp:5.1f}%')
    exc=sum(int(x[5] or 0) for x in d if x[5].isdigit()); print('   excessive smem wavefronts', exc)
