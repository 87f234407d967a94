// Command imd is the instant-messaging server: `imd serve` (the default)
// runs it, `imd migrate` only applies the database migrations.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "imd:", err)
		os.Exit(1)
	}
}

// run is main without the process: tests call it on port :0 and cancel ctx
// to shut the server down.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	return runWith(ctx, args, getenv, stdout, stderr, options{})
}
