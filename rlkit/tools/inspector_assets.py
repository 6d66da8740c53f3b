"""Inline CSS and JavaScript of the ``rlkit inspect`` page (kept apart from the Python logic)."""

CSS = """
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222}
header{padding:12px 20px 6px}h1{font-size:19px;margin:0 0 2px}h2{font-size:15px;margin:0}.mut{color:#666}
.bar{position:sticky;top:0;z-index:5;background:#fffffff0;border-bottom:1px solid #ddd;padding:7px 20px;
display:flex;flex-wrap:wrap;gap:8px 16px;align-items:center;font-size:13px}
#maps button{font:inherit;border:1px solid #bbb;background:#f6f6f6;border-radius:4px;padding:2px 8px;margin:1px;cursor:pointer}
#maps button.on{background:#2166ac;color:#fff;border-color:#2166ac}
.legend{display:flex;flex-direction:column;min-width:240px}.grad{height:11px;border:1px solid #bbb;border-radius:2px}
.ticks{display:flex;justify-content:space-between;font:11px ui-monospace,monospace;color:#555}
main{padding:6px 20px 40px;max-width:1280px}
table{border-collapse:collapse;font-size:12.5px}td,th{padding:3px 9px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f3f3f3;font-weight:600}td:first-child,th:first-child{text-align:left}
#summary tr[data-map]{cursor:pointer}#summary tr.on{background:#eef4fb}td.desc{white-space:normal;text-align:left;color:#555;min-width:260px}h2 .mut{font-weight:normal;font-size:12.5px}
#mdesc{flex-basis:100%;font-size:12px}
.spark{display:inline-flex;gap:2px;align-items:flex-end;height:16px}.spark i{width:7px;background:#4393c3;min-height:1px}
.grp{border:1px solid #d5d5d5;border-radius:7px;margin:18px 0;background:#fbfbfb;overflow:hidden}
.gh{padding:8px 12px;background:#f1f1f1;border-bottom:1px solid #ddd}.kv{font-size:12.5px;margin-top:3px}
.prompt,.answer{white-space:pre-wrap;font:12.5px/1.4 ui-monospace,Menlo,monospace;max-height:11em;overflow:auto;
background:#fff;border:1px solid #e4e4e4;border-radius:4px;padding:5px 7px;margin:4px 0}
.warn{color:#b35806;font-weight:600}
.resp{border-top:1px solid #e2e2e2;padding:7px 12px}.rh{font-size:12.5px;display:flex;gap:6px 12px;flex-wrap:wrap;align-items:center}
.badge{padding:0 7px;border-radius:9px;background:#e6e6e6;font-size:11.5px}.badge.length,.badge.abort{background:#fdb863}
.rs{color:#555;font-family:ui-monospace,monospace;font-size:11.5px}
canvas.strip{width:100%;height:12px;display:block;margin:5px 0 4px;cursor:pointer;border-radius:2px;background:#f7f7f7}
.toks{white-space:pre-wrap;word-break:break-word;font:13px/1.75 ui-monospace,SFMono-Regular,Menlo,monospace;
max-height:17em;overflow:auto;background:#fff;border:1px solid #e4e4e4;border-radius:4px;padding:5px 7px}
body.full .toks{max-height:none}.t{border-radius:2px}.t:hover,.t.hl{outline:2px solid #111}.nl,.e{color:#999}
#tip{position:fixed;display:none;z-index:10;background:#1e1e1e;color:#eee;font:12px/1.4 ui-monospace,monospace;
padding:7px 9px;border-radius:5px;pointer-events:none;max-width:460px;box-shadow:0 2px 8px #0005}
#tip td{border:none;padding:0 6px;color:#eee;text-align:left}#tip b{color:#ffd166}#tip .pin{color:#999;font-size:11px}
select{font:inherit}label{cursor:pointer}
"""

JS = r"""
(()=>{
const D=JSON.parse(document.getElementById('rlkit-data').textContent);
const hex=h=>[1,3,5].map(i=>parseInt(h.slice(i,i+2),16)), A={div:D.cmap.div.map(hex),seq:D.cmap.seq.map(hex)};
const esc=s=>String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const g=x=>x==null?'n/a':String(parseFloat(Number(x).toPrecision(4)));
const amax=v=>v.reduce((a,x)=>Math.max(a,Math.abs(x)),0),vmin=v=>v.reduce((a,x)=>Math.min(a,x),Infinity),
 vmax=v=>v.reduce((a,x)=>Math.max(a,x),-Infinity);
function ramp(a,u){u=Math.min(1,Math.max(0,u))*(a.length-1);const i=Math.min(Math.floor(u),a.length-2),f=u-i;
 return 'rgb('+a[i].map((c,j)=>Math.round(c+(a[i+1][j]-c)*f)).join(',')+')';}
const R=[...document.querySelectorAll('.resp')].map(el=>({el,d:D.resp[+el.dataset.r],toks:[...el.querySelectorAll('.t')],
 cv:el.querySelector('canvas'),st:el.querySelector('.rs')}));
R.forEach(x=>x.toks.forEach((t,k)=>{t._R=x;t._k=k;}));
const spec=n=>D.maps.find(m=>m.name===n);
let cur=(location.hash.match(/map=([^&]+)/)||[])[1];cur=cur&&spec(decodeURIComponent(cur))?decodeURIComponent(cur):D.maps[0].name;
const mode=()=>document.getElementById('scale').value;
function range(m,v){const ok=v.filter(x=>x!=null);
 if(m.kind==='div'){let s=mode()==='row'?amax(ok):mode()==='max'?m.amax:(m.p99||m.amax);return [-(s||1),s||1];}
 if(mode()==='row'&&ok.length)return [vmin(ok),vmax(ok)];
 const hi=mode()==='max'||m.q99<=m.min?m.max:m.q99;return [m.min,hi];}
function color(v,m,lo,hi){if(v==null)return ['#ddd','#222'];
 if(m.kind==='div'){const x=v/hi;return [ramp(A.div,(x+1)/2),Math.abs(x)>0.72?'#fff':''];}
 const u=hi>lo?(v-lo)/(hi-lo):0;return [ramp(A.seq,u),u>0.72?'#fff':''];}
function rowStats(v){const ok=v.filter(x=>x!=null);if(!ok.length)return 'no values';const s=ok.reduce((a,b)=>a+b,0);
 return 'mean '+g(s/ok.length)+' · Σ '+g(s)+' · min '+g(vmin(ok))+' · max '+g(vmax(ok));}
function strip(x,m,lo,hi){const c=x.cv,W=c.width=Math.max(1,Math.round(c.clientWidth*devicePixelRatio)),H=c.height=24,
 v=x.d.m[m.name]||[],n=v.length,ctx=c.getContext&&c.getContext('2d'),mid=m.kind==='div'?0:lo;if(!n||!ctx)return;
 for(let p=0;p<W;p++){const k0=Math.floor(p*n/W),k1=Math.max(k0+1,Math.floor((p+1)*n/W));let best=null;
  for(let k=k0;k<k1&&k<n;k++)if(v[k]!=null&&(best==null||Math.abs(v[k]-mid)>Math.abs(best-mid)))best=v[k];
  ctx.fillStyle=color(best,m,lo,hi)[0];ctx.fillRect(p,6,1,H-6);}
 D.markers.forEach((mk,i)=>{if(!document.body.classList.contains('mk'+i))return;const mv=x.d.m[mk.name]||[];ctx.fillStyle=mk.color;
  mv.forEach((b,k)=>{if(b===1)ctx.fillRect(Math.floor(k*W/n),0,Math.max(2,Math.round(W/n)),5);});});}
function legend(m,lo,hi){const a=m.kind==='div'?D.cmap.div:D.cmap.seq;
 document.querySelector('.grad').style.background='linear-gradient(to right,'+a.join(',')+')';
 const t=[0,1,2,3,4].map(i=>lo+(hi-lo)*i/4);
 document.querySelector('.ticks').innerHTML=mode()==='row'?'<span>row min</span><span>per-response scale</span><span>row max</span>':t.map(x=>'<span>'+g(x)+'</span>').join('');
 document.getElementById('mdesc').textContent=m.name+': '+m.desc;}
function apply(){const m=spec(cur);let L=null;
 for(const x of R){const v=x.d.m[cur]||[],[lo,hi]=range(m,v);L=L||[lo,hi];
  x.toks.forEach((t,k)=>{const [b,f]=color(v[k],m,lo,hi);t.style.background=b;t.style.color=f;});
  x.st.textContent=m.label+': '+rowStats(v);strip(x,m,lo,hi);}
 legend(m,...(mode()==='row'?[0,1]:L||[0,1]));
 document.querySelectorAll('[data-map]').forEach(b=>b.classList.toggle('on',b.dataset.map===cur));
 try{history.replaceState(null,'','#map='+encodeURIComponent(cur));}catch(_){}}
document.addEventListener('click',e=>{const b=e.target.closest('[data-map]');if(b){cur=b.dataset.map;apply();}});
document.getElementById('scale').onchange=apply;
document.querySelectorAll('.mkbox').forEach(c=>c.onchange=()=>{document.body.classList.toggle(c.value,c.checked);apply();});
document.getElementById('full').onchange=e=>document.body.classList.toggle('full',e.target.checked);
const st=document.getElementById('step');if(st)st.onchange=()=>{if(st.value)location.href=st.value+location.hash;};
document.addEventListener('keydown',e=>{if(e.target.tagName==='INPUT'||e.target.tagName==='SELECT')return;
 const i=+e.key-1;if(i>=0&&i<D.maps.length&&i<9){cur=D.maps[i].name;apply();}});
const tip=document.getElementById('tip');let pinned=null;
function text(t){return t.classList.contains('e')?'':t.textContent.replace(/\u21b5\n/g,'\n');}
function show(t,e){const x=t._R,k=t._k,ids=x.d.ids,n=ids.length;
 let h='<div><b>'+esc(JSON.stringify(text(t)))+'</b> id '+ids[k]+' · pos '+k+'/'+n+'</div><table>';
 for(const m of D.maps){const v=(x.d.m[m.name]||[])[k];h+='<tr><td>'+(m.name===cur?'<b>'+esc(m.name)+'</b>':esc(m.name))+'</td><td>'+g(v)+'</td></tr>';}
 tip.innerHTML=h+'</table>'+(pinned?'<div class=pin>pinned: click elsewhere to release</div>':'');tip.style.display='block';place(e);}
function place(e){const w=tip.offsetWidth,h=tip.offsetHeight;let X=e.clientX+14,Y=e.clientY+16;
 if(X+w>innerWidth-4)X=Math.max(4,e.clientX-w-10);if(Y+h>innerHeight-4)Y=Math.max(4,e.clientY-h-12);tip.style.left=X+'px';tip.style.top=Y+'px';}
document.addEventListener('mouseover',e=>{const t=e.target.closest&&e.target.closest('.t');if(t&&!pinned)show(t,e);});
document.addEventListener('mousemove',e=>{if(!pinned&&tip.style.display==='block')place(e);});
document.addEventListener('mouseout',e=>{if(!pinned&&e.target.closest&&e.target.closest('.t'))tip.style.display='none';});
document.addEventListener('click',e=>{const t=e.target.closest('.t');if(pinned){pinned.classList.remove('hl');pinned=null;}
 if(t){pinned=t;t.classList.add('hl');show(t,e);}else if(!e.target.closest('#tip'))tip.style.display='none';});
R.forEach(x=>x.cv.addEventListener('click',e=>{const r=x.cv.getBoundingClientRect(),n=x.toks.length;if(!n)return;
 const t=x.toks[Math.min(n-1,Math.floor((e.clientX-r.left)/r.width*n))];const box=x.el.querySelector('.toks');
 box.scrollTop=t.offsetTop-box.offsetTop-box.clientHeight/2;t.classList.add('hl');setTimeout(()=>t.classList.remove('hl'),1500);}));
addEventListener('resize',()=>apply());apply();
})();
"""
