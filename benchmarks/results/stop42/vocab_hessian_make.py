import sys, torch
from moecompress.runtime.source import load_model
path = sys.argv[1] if sys.argv[1] != "demo" else None
loaded = load_model(path) if path else load_model()
m = loaded.model
E = m.model.embed_tokens.weight.detach().float()
ln = m.model.layers[0].input_layernorm
with torch.no_grad():
    x = ln(E[None].to(ln.weight.dtype))[0].float()
print(x.shape, x.norm(dim=1).mean())
torch.save(x.T @ x / x.shape[0], sys.argv[2])
