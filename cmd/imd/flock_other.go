//go:build !unix

package main

import "os"

// flockExclusive is not enforced on systems without flock: there, keeping
// one process per data directory is the operator's job.
func flockExclusive(*os.File) error { return nil }

func funlock(*os.File) error { return nil }
