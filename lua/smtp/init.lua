-- smtp: send mail (smtp.send, smtp.connect, smtp.deliver). Filled in by the client work.
local M = { _VERSION = "0.1.0" }
return M
