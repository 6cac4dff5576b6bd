"""The SIP edge proxy: messages, transports and flows, PBX links, bindings, routing."""
