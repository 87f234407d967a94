//go:build unix

package main

import (
	"errors"
	"os"
	"syscall"
)

// flockExclusive locks f exclusively without waiting (errLocked if another
// open file holds it). flock locks belong to the open file, so a second
// open in the same process conflicts too, and the kernel drops the lock when
// the process ends, however it ends.
func flockExclusive(f *os.File) error {
	err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return errLocked
	}
	return err
}

func funlock(f *os.File) error { return syscall.Flock(int(f.Fd()), syscall.LOCK_UN) }
