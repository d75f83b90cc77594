import csv, sys, collections
for fn in sys.argv[1:]:
    rows=list(csv.reader(open(fn)))
    hi=[i for i,r in enumerate(rows) if 'Source' in r][0]
    h=rows[hi]; idx={k:i for i,k in enumerate(h)}
    d=[r for r in rows[hi+1:] if len(r)==len(h)]
    cols=[k for k in h if k.startswith('stall_') and 'Not Issued' not in k]
    tot=collections.Counter()
    for r in d:
        for k in cols:
            v=r[idx[k]]
            if v and v.replace('.','').isdigit(): tot[k]+=float(v)
    s=sum(tot.values())
    print(fn, ' '.join(f"{k[6:]}={100*v/s:.1f}%" for k,v in tot.most_common(10)))
