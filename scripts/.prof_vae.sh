set -u
export LD_LIBRARY_PATH="/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib"
mkdir -p /tmp/b && gunzip -c gpu-bin/bench.gz > /tmp/b/bench && chmod +x /tmp/b/bench
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
timeout 400 $NCU --metrics gpu__time_duration.sum --launch-skip 1500 --launch-count 1000 --csv \
  /tmp/b/bench --sections vae --slow-iters 1 --warmup 0 > $OUT/ncu.csv 2> $OUT/ncu.err
echo "rc=$?"; wc -l $OUT/ncu.csv; tail -3 $OUT/ncu.err
python3 - <<'PY'
import csv, os, collections
rows=list(csv.reader(open(os.environ['OUT']+'/ncu.csv')))
hdr=None; agg=collections.defaultdict(lambda:[0,0.0]); order=[]
for r in rows:
    if 'Kernel Name' in r: hdr=r; continue
    if hdr is None or len(r)!=len(hdr): continue
    d=dict(zip(hdr,r))
    if d.get('Metric Name')!='gpu__time_duration.sum': continue
    name=d['Kernel Name'][:70]; v=float(d['Metric Value'].replace(',',''))
    unit=d.get('Metric Unit','')
    ms = v/1e6 if unit in ('nsecond','ns') else (v/1e3 if unit in ('usecond','us') else v)
    agg[name][0]+=1; agg[name][1]+=ms; order.append((name,ms))
tot=sum(v[1] for v in agg.values())
print(f"total {tot:.2f} ms over {len(order)} kernels; unit {unit}")
for n,(c,ms) in sorted(agg.items(), key=lambda kv:-kv[1][1])[:40]:
    print(f"{ms:9.3f} ms {c:4d}x  {n}")
print("--- sequence (first 120)")
for n,ms in order[:0]: print(f"{ms:8.3f} {n}")
PY
