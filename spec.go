// Package imd holds what belongs to the repository as a whole: the contract,
// openapi.yaml, embedded so the server can serve it at /openapi.yaml exactly
// as written (the generated code embeds a JSON rendering).
package imd

import _ "embed"

// OpenAPI is openapi.yaml.
//
//go:embed openapi.yaml
var OpenAPI []byte
