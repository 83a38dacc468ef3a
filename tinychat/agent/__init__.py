"""The tool-using agent (docs/agent.md): OpenAI-format function calling over a local model or any server.

tools.py     a registry: typed Python functions -> JSON-schema tools; arguments validated, errors fed back
builtin.py   calculator, knowledge-base search, sandboxed python, workspace files, current time
calculator.py  the calculator tool's safe arithmetic (an AST walker, never eval)
sandbox.py   the code sandbox (bubblewrap / namespaces / rlimits), docs/sandbox.md
loop.py      the agent loop: tool calls, step and time budgets, plan-then-execute, reflection, traces
memory.py    short-term summarisation near the context budget; long-term facts in a vector store
mcp.py       Model Context Protocol: use MCP servers' tools; serve tinychat's tools (tinychat mcp-serve)
cli.py       tinychat agent "task";  evaluate.py: tinychat agent eval
"""
